package model

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/uptrace/bun"
)

// StreamTicket is a one-time pass to open one agent's stream: a browser
// cannot set an Authorization header on EventSource or WebSocket, so it
// trades its token for a ticket and puts that in the URL. Tickets live in
// the database so that any instance can redeem one.
type StreamTicket struct {
	bun.BaseModel `bun:"table:stream_tickets"`

	ID        string     `bun:"id,pk"` // 128 random bits, hex
	TownID    string     `bun:"town_id,notnull"`
	AgentID   string     `bun:"agent_id,notnull"`
	ExpiresAt time.Time  `bun:"expires_at,notnull"`
	UsedAt    *time.Time `bun:"used_at"`
}

// CreateTicket stores a new ticket for one agent of a town, valid for ttl.
func (s *Store) CreateTicket(ctx context.Context, town, agent string, ttl time.Duration) (*StreamTicket, error) {
	var raw [16]byte
	rand.Read(raw[:])
	t := &StreamTicket{
		ID:        hex.EncodeToString(raw[:]),
		TownID:    town,
		AgentID:   agent,
		ExpiresAt: time.Now().UTC().Add(ttl).Truncate(time.Microsecond),
	}
	if _, err := s.db.NewInsert().Model(t).Exec(ctx); err != nil {
		return nil, fmt.Errorf("create ticket: %w", err)
	}
	return t, nil
}

// RedeemTicket uses up a ticket for town and agent. It is one UPDATE, so of
// two concurrent redeems exactly one wins. It reports false — and changes
// nothing — for an unknown, used or expired ticket, or one of another town
// or agent.
func (s *Store) RedeemTicket(ctx context.Context, id, town, agent string) (bool, error) {
	now := time.Now().UTC()
	res, err := s.db.NewUpdate().Model((*StreamTicket)(nil)).
		Set("used_at = ?", now).
		Where("id = ?", id).
		Where("town_id = ?", town).
		Where("agent_id = ?", agent).
		Where("used_at IS NULL").
		Where("expires_at > ?", now).
		Exec(ctx)
	if err != nil {
		return false, fmt.Errorf("redeem ticket: %w", err)
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// SweepTickets deletes tickets that expired before cutoff.
func (s *Store) SweepTickets(ctx context.Context, cutoff time.Time) (int64, error) {
	res, err := s.db.NewDelete().Model((*StreamTicket)(nil)).
		Where("expires_at < ?", cutoff.UTC()).Exec(ctx)
	if err != nil {
		return 0, fmt.Errorf("sweep tickets: %w", err)
	}
	return res.RowsAffected()
}
