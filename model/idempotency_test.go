package model

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

func batchOf(agent string, n int) []Event {
	evs := make([]Event, n)
	for i := range evs {
		evs[i] = ev("t", "r", agent, "x", i)
	}
	return evs
}

func idsOf(evs []Event) []int64 {
	out := make([]int64, len(evs))
	for i := range evs {
		out[i] = evs[i].ID
	}
	return out
}

// A keyed batch is stored once: a retry with the same key and hash gets
// the first ids and stores nothing, across a restart too; another hash is
// refused; the same key of another agent or town is another key.
func TestAppendOnce(t *testing.T) {
	ctx := context.Background()
	path := tempDSN(t)
	s, err := Open(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	first := batchOf("a", 3)
	if replayed, err := s.AppendOnce(ctx, first, Once{Key: "k1", Hash: "h1"}); err != nil || replayed {
		t.Fatalf("first: %v %v", replayed, err)
	}
	s.Close()
	s, err = Open(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	retry := batchOf("a", 3)
	if replayed, err := s.AppendOnce(ctx, retry, Once{Key: "k1", Hash: "h1"}); err != nil || !replayed {
		t.Fatalf("retry after a restart: replayed %v, %v", replayed, err)
	}
	if !slices.Equal(idsOf(retry), idsOf(first)) {
		t.Fatalf("retry got ids %v, want %v", idsOf(retry), idsOf(first))
	}
	if _, err := s.AppendOnce(ctx, batchOf("a", 3), Once{Key: "k1", Hash: "other"}); !errors.Is(err, ErrKeyReused) {
		t.Fatalf("same key, another request: %v", err)
	}
	if replayed, err := s.AppendOnce(ctx, batchOf("b", 3), Once{Key: "k1", Hash: "h1"}); err != nil || replayed {
		t.Fatalf("the same key for another agent: %v %v", replayed, err)
	}
	if got, _ := s.After(ctx, AgentKey{Town: "t", Agent: "a"}, 0, 100); len(got) != 3 {
		t.Fatalf("agent a holds %d events, want 3", len(got))
	}
	// Swept after the window: the key is free again.
	if n, err := s.SweepKeys(ctx, time.Now().Add(time.Minute)); err != nil || n != 2 {
		t.Fatalf("swept %d, %v", n, err)
	}
	if replayed, _ := s.AppendOnce(ctx, batchOf("a", 3), Once{Key: "k1", Hash: "h1"}); replayed {
		t.Fatal("a swept key still replays")
	}
}

// Identical keyed appends at once, in one group commit or several: the
// batch is stored once and every caller gets its ids.
func TestAppendOnceConcurrent(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{})
	const n = 8
	batches := make([][]Event, n)
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range batches {
		batches[i] = batchOf("a", 5)
		wg.Go(func() { _, errs[i] = s.AppendOnce(ctx, batches[i], Once{Key: "same", Hash: "h"}) })
	}
	wg.Wait()
	for i := range batches {
		if errs[i] != nil || !slices.Equal(idsOf(batches[i]), idsOf(batches[0])) {
			t.Fatalf("caller %d: ids %v err %v; caller 0 got %v", i, idsOf(batches[i]), errs[i], idsOf(batches[0]))
		}
	}
	if got, _ := s.After(ctx, AgentKey{Town: "t", Agent: "a"}, 0, 100); len(got) != 5 {
		t.Fatalf("stored %d events, want one batch of 5", len(got))
	}
}

func TestRanges(t *testing.T) {
	for _, ids := range [][]int64{{1}, {1, 2, 3}, {1, 2, 5, 6, 9}} {
		got, err := parseRanges(formatRanges(ids))
		if err != nil || !slices.Equal(got, ids) {
			t.Fatalf("%v -> %q -> %v %v", ids, formatRanges(ids), got, err)
		}
	}
}
