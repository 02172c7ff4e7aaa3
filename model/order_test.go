package model

import (
	"context"
	"sync"
	"testing"
)

// TestOrderUnderConcurrentWriters: two stores on one database (two
// instances, two pools) append to one agent, and to other agents of its
// town, at once, while readers tail "id > cursor" of the agent and of the
// whole town the whole time. Every reader sees every id exactly once, in
// increasing order: no id commits after a larger one of the same town was
// read. On PostgreSQL this is what the per-town advisory lock buys.
func TestOrderUnderConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	stores := twoStores(t)
	const batches = 150
	var writers sync.WaitGroup
	for w, s := range stores {
		for _, agent := range []string{"shared", "own"} {
			writers.Go(func() {
				for i := range batches {
					evs := make([]Event, 1+i%4)
					for j := range evs {
						evs[j] = ev("t", "r", agent, "x", w*1000+i)
					}
					if err := s.Append(ctx, evs); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
	}
	// Readers tail until the writers are done and they have read it all.
	done := make(chan struct{})
	go func() { writers.Wait(); close(done) }()
	tail := func(read func(after int64) []int64) []int64 {
		var seen []int64
		var cursor int64
		finished := false
		for {
			select {
			case <-done:
				finished = true
			default:
			}
			ids := read(cursor)
			for _, id := range ids {
				if id <= cursor {
					t.Errorf("id %d read after %d", id, cursor)
				}
				cursor = id
			}
			seen = append(seen, ids...)
			if finished && len(ids) == 0 {
				return seen
			}
		}
	}
	reader := stores[1]
	var agentIDs, townIDs []int64
	var readers sync.WaitGroup
	readers.Go(func() {
		agentIDs = tail(func(after int64) []int64 {
			evs, err := reader.After(ctx, AgentKey{Town: "t", Agent: "shared"}, after, 50)
			if err != nil {
				t.Error(err)
			}
			return idsOf(evs)
		})
	})
	readers.Go(func() {
		townIDs = tail(func(after int64) []int64 {
			var ids []int64
			err := reader.DB().NewSelect().Model((*Event)(nil)).Column("id").
				Where("town_id = ?", "t").Where("id > ?", after).OrderExpr("id ASC").Limit(50).Scan(ctx, &ids)
			if err != nil {
				t.Error(err)
			}
			return ids
		})
	})
	readers.Wait()
	if t.Failed() {
		return
	}
	var all []int64
	if err := reader.DB().NewSelect().Model((*Event)(nil)).Column("id").Where("town_id = ?", "t").
		OrderExpr("id ASC").Scan(ctx, &all); err != nil {
		t.Fatal(err)
	}
	var shared []int64
	if err := reader.DB().NewSelect().Model((*Event)(nil)).Column("id").Where("agent_id = ?", "shared").
		OrderExpr("id ASC").Scan(ctx, &shared); err != nil {
		t.Fatal(err)
	}
	if len(townIDs) != len(all) || len(agentIDs) != len(shared) {
		t.Fatalf("the town reader saw %d of %d ids, the agent reader %d of %d: ids were skipped", len(townIDs), len(all), len(agentIDs), len(shared))
	}
}

// TestOpenTogether: instances started at the same moment on a new
// database all open it; the schema is made once.
func TestOpenTogether(t *testing.T) {
	dsn := tempDSN(t)
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			s, err := Open(context.Background(), dsn, Options{})
			if err == nil {
				s.Close()
			}
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatalf("open with others at once: %v", err)
		}
	}
}

// twoStores opens two stores on one fresh database, as two instances
// (two connection pools) open it, keeping every event.
func twoStores(t *testing.T) []*Store {
	t.Helper()
	dsn := tempDSN(t)
	var stores []*Store
	for range 2 {
		s, err := Open(context.Background(), dsn, Options{Retain: -1})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		stores = append(stores, s)
	}
	return stores
}
