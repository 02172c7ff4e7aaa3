package model

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/uptrace/bun"
)

// IdempotencyKey remembers a keyed append: the key a client sent with a
// batch, scoped to its agent of its town, a hash of the request, and the ids
// the batch got. A retry with the same key finds it and is answered with
// those ids instead of storing the batch again. It is written in the same
// transaction as the events, so a batch is never stored without its key,
// nor a key without its batch.
type IdempotencyKey struct {
	bun.BaseModel `bun:"table:idempotency_keys"`

	TownID    string    `bun:"town_id,pk"`
	AgentID   string    `bun:"agent_id,pk"`
	Key       string    `bun:"key,pk"`
	Hash      string    `bun:"hash,notnull"` // of the request that first used the key
	IDs       string    `bun:"ids,notnull"`  // the ids it got, as ranges: "7-9,12-12"
	CreatedAt time.Time `bun:"created_at,notnull"`
}

// Once names a keyed append: the client's key and a hash of its request.
type Once struct {
	Key  string
	Hash string
}

// ErrKeyReused is AppendOnce's error for a key already used, within the
// window, with a different request.
var ErrKeyReused = errors.New("idempotency key already used with another request")

// AppendOnce is Append for a keyed request. The first request with a key
// is appended, and the key stored with its ids in the same transaction. A
// later request with the same key for the same agent of the same town, and
// the same hash, stores nothing: its events get the first request's ids
// and replayed is true. One with another hash gets ErrKeyReused. Two
// identical requests at once get the same ids; the batch is stored once.
// All events must be of one agent of one town.
func (s *Store) AppendOnce(ctx context.Context, events []Event, once Once) (replayed bool, err error) {
	if len(events) == 0 {
		return false, nil
	}
	for _, e := range events[1:] {
		if e.TownID != events[0].TownID || e.AgentID != events[0].AgentID {
			return false, errors.New("append once: events of more than one agent")
		}
	}
	r := &appendReq{events: events, once: &once}
	if err := s.enqueue(ctx, r); err != nil {
		return false, err
	}
	return r.replayed, nil
}

// checkKeys resolves the keyed requests of a group before anything is
// written: a key already stored makes its request a replay (or refuses it,
// for another hash); a key used twice in the group makes the second
// request follow the first.
func checkKeys(ctx context.Context, tx bun.Tx, group []*appendReq) error {
	type scope struct{ town, agent, key string }
	var first map[scope]*appendReq
	for _, r := range group {
		if r.once == nil {
			continue
		}
		k := scope{r.events[0].TownID, r.events[0].AgentID, r.once.Key}
		if leader := first[k]; leader != nil {
			if leader.once.Hash != r.once.Hash {
				r.err = ErrKeyReused
			} else {
				r.leader = leader
			}
			continue
		}
		if first == nil {
			first = make(map[scope]*appendReq)
		}
		first[k] = r
		var row IdempotencyKey
		err := tx.NewSelect().Model(&row).
			Where("town_id = ?", k.town).Where("agent_id = ?", k.agent).Where("key = ?", k.key).Scan(ctx)
		if errors.Is(err, sql.ErrNoRows) {
			continue
		}
		if err != nil {
			return fmt.Errorf("idempotency key: %w", err)
		}
		if row.Hash != r.once.Hash {
			r.err = ErrKeyReused
			continue
		}
		ids, err := parseRanges(row.IDs)
		if err != nil || len(ids) != len(r.events) {
			r.err = ErrKeyReused // the same hash with another count cannot be the same request
			continue
		}
		for i := range r.events {
			r.events[i].ID = ids[i]
		}
		r.replayed = true
	}
	return nil
}

// storeKey records a keyed request's key with the ids its events got.
func storeKey(ctx context.Context, tx bun.Tx, r *appendReq) error {
	ids := make([]int64, len(r.events))
	for i := range r.events {
		ids[i] = r.events[i].ID
	}
	row := &IdempotencyKey{TownID: r.events[0].TownID, AgentID: r.events[0].AgentID, Key: r.once.Key,
		Hash: r.once.Hash, IDs: formatRanges(ids), CreatedAt: time.Now().UTC()}
	if _, err := tx.NewInsert().Model(row).Exec(ctx); err != nil {
		return fmt.Errorf("store idempotency key: %w", err)
	}
	return nil
}

// SweepKeys deletes idempotency keys stored before cutoff.
func (s *Store) SweepKeys(ctx context.Context, cutoff time.Time) (int64, error) {
	res, err := s.db.NewDelete().Model((*IdempotencyKey)(nil)).Where("created_at < ?", cutoff.UTC()).Exec(ctx)
	if err != nil {
		return 0, fmt.Errorf("sweep idempotency keys: %w", err)
	}
	return res.RowsAffected()
}

// formatRanges writes ascending ids as runs, "first-last" joined by ",":
// a batch's ids are one run when they are consecutive, as they are here.
func formatRanges(ids []int64) string {
	var b strings.Builder
	for i := 0; i < len(ids); {
		j := i
		for j+1 < len(ids) && ids[j+1] == ids[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(ids[i], 10))
		b.WriteByte('-')
		b.WriteString(strconv.FormatInt(ids[j], 10))
		i = j + 1
	}
	return b.String()
}

func parseRanges(s string) ([]int64, error) {
	var ids []int64
	for run := range strings.SplitSeq(s, ",") {
		a, b, ok := strings.Cut(run, "-")
		lo, err1 := strconv.ParseInt(a, 10, 64)
		hi, err2 := strconv.ParseInt(b, 10, 64)
		if !ok || err1 != nil || err2 != nil || hi < lo || hi-lo > 1<<20 {
			return nil, fmt.Errorf("bad id ranges %q", s)
		}
		for id := lo; id <= hi; id++ {
			ids = append(ids, id)
		}
	}
	return ids, nil
}
