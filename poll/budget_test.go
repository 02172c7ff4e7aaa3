package poll

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/agentstream/agentstream/model"
)

// TestStreamByteBudget: with 64 KiB events, a subscriber that does not
// read holds at most its byte budget plus one event, however many events
// pass; when it reads again it gets every event once, in order, in
// batches within the budget.
func TestStreamByteBudget(t *testing.T) {
	const budget = 256 << 10
	e := newEnv(t, model.Options{Retain: -1}, Options{StreamBytes: budget})
	data := []byte(`"` + strings.Repeat("x", 64<<10-2) + `"`)
	ctx := context.Background()
	post := func(n int) []int64 {
		evs := make([]model.Event, n)
		for i := range evs {
			evs[i] = model.Event{TownID: "t", RigID: "r", AgentID: "big", Type: "x", Data: data}
		}
		if err := e.store.Append(ctx, evs); err != nil {
			t.Fatal(err)
		}
		var ids []int64
		for _, ev := range evs {
			ids = append(ids, ev.ID)
		}
		return ids
	}
	backlog := post(20)
	sub, err := e.sched.Subscribe(ctx, key("big"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	itemCost := (&Item{Event: model.Event{Type: "x", Data: data}}).Cost()
	limit := budget + itemCost

	var got []int64
	var buf []*Item
	read := func() {
		buf, err = sub.Next(ctx, buf, 256)
		if err != nil {
			t.Fatal(err)
		}
		var size int64
		for _, it := range buf {
			size += it.Cost()
			got = append(got, it.ID)
		}
		if len(buf) > 1 && size > budget {
			t.Fatalf("a batch of %d events holds %d bytes; the budget is %d", len(buf), size, budget)
		}
		if h := sub.held.Load(); h > limit {
			t.Fatalf("the subscriber holds %d bytes; at most %d allowed", h, limit)
		}
	}
	read() // a backfill batch, then the reader stalls
	want := append([]int64(nil), backlog...)
	for range 10 {
		want = append(want, post(10)...)
		waitFor(t, "the feed to fan out", func() bool { return e.feedCursor(key("big")) == want[len(want)-1] })
		if h := sub.held.Load(); h > limit {
			t.Fatalf("a stalled subscriber holds %d bytes; at most %d allowed", h, limit)
		}
	}
	for len(got) < len(want) {
		read()
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got %d events %v..., want %d in order", len(got), got[:min(5, len(got))], len(want))
	}
}

// feedCursor is the id up to which k's feed has read, or -1 with no feed.
func (e *env) feedCursor(k model.AgentKey) int64 {
	e.sched.mu.RLock()
	f := e.sched.feeds[feedKey(k)]
	e.sched.mu.RUnlock()
	if f == nil {
		return -1
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cursor
}
