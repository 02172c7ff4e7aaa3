package model

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
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

// ErrTooManyTickets is CreateTicket's error when the town already holds
// its limit of unredeemed tickets.
var ErrTooManyTickets = errors.New("too many unredeemed stream tickets")

// CreateTicket stores a new ticket for one agent of a town, valid for ttl,
// unless the town already holds limit unredeemed, unexpired tickets (then
// ErrTooManyTickets; limit <= 0 means no limit). The count and the insert
// are one statement, so concurrent requests cannot overshoot the limit.
func (s *Store) CreateTicket(ctx context.Context, town, agent string, ttl time.Duration, limit int) (*StreamTicket, error) {
	var raw [16]byte
	rand.Read(raw[:])
	now := time.Now().UTC()
	t := &StreamTicket{
		ID:        hex.EncodeToString(raw[:]),
		TownID:    town,
		AgentID:   agent,
		ExpiresAt: now.Add(ttl).Truncate(time.Microsecond),
	}
	if limit <= 0 {
		limit = math.MaxInt32
	}
	res, err := s.db.NewRaw(`INSERT INTO stream_tickets (id, town_id, agent_id, expires_at)
		SELECT ?, ?, ?, ? WHERE (SELECT COUNT(*) FROM stream_tickets
			WHERE town_id = ? AND used_at IS NULL AND expires_at > ?) < ?`,
		t.ID, t.TownID, t.AgentID, t.ExpiresAt, town, now, limit).Exec(ctx)
	if err != nil {
		return nil, fmt.Errorf("create ticket: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return nil, fmt.Errorf("create ticket: %w", err)
	} else if n == 0 {
		return nil, ErrTooManyTickets
	}
	return t, nil
}

// ValidTicketID reports whether id has the shape of a ticket id: 32
// lowercase hex digits. Anything else is refused before the database is
// asked.
func ValidTicketID(id string) bool {
	if len(id) != 32 {
		return false
	}
	for _, c := range []byte(id) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
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
