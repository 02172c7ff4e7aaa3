package poll

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
)

// townIDs is every id the store holds for town t, in order.
func (e *env) townIDs(t testing.TB) []int64 {
	t.Helper()
	evs, err := e.store.After(context.Background(), model.AgentKey{Town: "t"}, 0, 100000)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]int64, len(evs))
	for i := range evs {
		ids[i] = evs[i].ID
	}
	return ids
}

// TestTownFeedUnion: subscribers of a town, some from the start, some
// joining mid-way at a cursor, while four agents of the town (and one of
// another town) are written concurrently: each gets exactly the town's ids
// after its cursor, in order, once, and the town has one feed.
func TestTownFeedUnion(t *testing.T) {
	e := newEnv(t, model.Options{Retain: -1}, Options{QueueLen: 8, RingLen: 64})
	town := model.AgentKey{Town: "t"}
	var subs []*Subscription
	for range 5 {
		sub, err := e.sched.Subscribe(context.Background(), town, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Close()
		subs = append(subs, sub)
	}
	var writers sync.WaitGroup
	for _, agent := range []string{"a", "b", "c", "d"} {
		writers.Go(func() {
			for range 60 {
				e.append(t, agent, "step", 1+len(agent)%3)
			}
		})
	}
	writers.Go(func() {
		for range 60 {
			evs := []model.Event{{TownID: "other", RigID: "r", AgentID: "a", Type: "step", Data: []byte(`{}`)}}
			if err := e.store.Append(context.Background(), evs); err != nil {
				t.Error(err)
			}
		}
	})
	// A late joiner at a cursor in the middle.
	waitFor(t, "some of the town written", func() bool { return len(e.townIDs(t)) > 100 })
	mid := e.townIDs(t)[50]
	late, err := e.sched.Subscribe(context.Background(), town, mid)
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	writers.Wait()
	if n := e.sched.ActiveFeeds(); n != 1 {
		t.Fatalf("%d feeds for one town's subscribers, want 1", n)
	}
	e.append(t, "a", "end", 1)
	want := e.townIDs(t)
	for i, sub := range append(subs, late) {
		got, err := readUntil(t, sub, nil)
		if err != nil {
			t.Fatalf("subscriber %d: %v", i, err)
		}
		if from := sub == late; from && !slices.Equal(got, after(want, mid)) || !from && !slices.Equal(got, want) {
			t.Fatalf("subscriber %d got %d ids, want the town's %d after its cursor", i, len(got), len(want))
		}
	}
}

// TestTownGapPerAgent: retention prunes two of a town's agents past a
// subscriber's cursor before it reads them. The subscriber is told of each
// agent's loss once, naming the agent, before any later event, and then
// gets every event the store still holds, of every agent, once.
func TestTownGapPerAgent(t *testing.T) {
	e := newEnv(t, model.Options{Retain: 5}, Options{QueueLen: 4, RingLen: 4})
	town := model.AgentKey{Town: "t"}
	start := e.append(t, "quiet", "step", 3)
	sub, err := e.sched.Subscribe(context.Background(), town, start[len(start)-1])
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for range 20 {
		e.append(t, "busy1", "step", 1)
		e.append(t, "busy2", "step", 1)
	}
	end := e.append(t, "quiet", "end", 1)[0]
	// The feed has read it all before retention runs: the loss is the
	// subscriber's alone, which it learns on its catch-up read.
	waitFor(t, "the town's feed to read every event", func() bool { return e.feedCursor(town) >= end })
	if err := e.store.Prune(context.Background()); err != nil {
		t.Fatal(err)
	}
	kept := e.townIDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got []int64
	gaps := map[string]*GapError{}
	var buf []*Item
	for len(got) == 0 || got[len(got)-1] != kept[len(kept)-1] {
		buf, err = sub.Next(ctx, buf, 100)
		var gap *GapError
		if errors.As(err, &gap) {
			if gaps[gap.Agent] != nil {
				t.Fatalf("a second gap for %s: %v after %v", gap.Agent, gap, gaps[gap.Agent])
			}
			if len(got) > 0 {
				t.Fatalf("gap %v after events %v", gap, got)
			}
			gaps[gap.Agent] = gap
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, it := range buf {
			got = append(got, it.ID)
		}
	}
	if len(gaps) != 2 || gaps["busy1"] == nil || gaps["busy2"] == nil {
		t.Fatalf("gaps %v, want one each for busy1 and busy2", gaps)
	}
	if !slices.Equal(got, after(kept, start[len(start)-1])) {
		t.Fatalf("got %v, want what the store holds %v", got, kept)
	}
}

// TestFeedBehindRetention: another instance writes a burst to an agent and
// its retention prunes it before this instance's feed polls (its LISTEN
// is down: the feed polls hourly here, and is poked once at the end, as
// LISTEN coming back does). A live subscriber, of the agent's feed and of
// the town's, is told of the gap, then gets the events still held: never
// a silent skip.
func TestFeedBehindRetention(t *testing.T) {
	for _, k := range []model.AgentKey{key("a"), {Town: "t"}} {
		t.Run("town="+fmt.Sprint(k.IsTown()), func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, model.Options{Retain: 5}, Options{Interval: time.Hour, MinRetained: 5})
			other, err := model.Open(ctx, e.path, model.Options{Retain: 5})
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			first := e.append(t, "a", "step", 1)[0]
			sub, err := e.sched.Subscribe(ctx, k, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Close()
			if got, err := sub.Next(ctx, nil, 10); err != nil || len(got) != 1 || got[0].ID != first {
				t.Fatalf("first read: %v %v", got, err)
			}
			waitFor(t, "the feed at the first event", func() bool { return e.feedCursor(k) >= first })
			if got, err := sub.TryNext(ctx, nil, 10); err != nil || len(got) != 0 {
				t.Fatalf("joining live: %v %v", got, err)
			}
			evs := make([]model.Event, 20)
			for i := range evs {
				evs[i] = model.Event{TownID: "t", RigID: "r", AgentID: "a", Type: "step", Data: json.RawMessage(`{}`)}
			}
			if err := other.Append(ctx, evs); err != nil {
				t.Fatal(err)
			}
			if err := other.Prune(ctx); err != nil {
				t.Fatal(err)
			}
			kept := e.allIDs(t, "a")
			e.sched.NotifyKeys(nil)
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			got, err := sub.Next(rctx, nil, 100)
			var gap *GapError
			if !errors.As(err, &gap) {
				var ids []int64
				for _, it := range got {
					ids = append(ids, it.ID)
				}
				marks, _ := e.store.PrunedAfter(ctx, "t", 0)
				t.Fatalf("after the pruned burst: %v %v, want a gap first (kept %v, first %d, marks %+v, feed %d)", ids, err, kept, first, marks, e.feedCursor(k))
			}
			var ids []int64
			for len(ids) < len(kept) {
				got, err := sub.Next(rctx, nil, 100)
				if err != nil {
					t.Fatal(err)
				}
				for _, it := range got {
					ids = append(ids, it.ID)
				}
			}
			if !slices.Equal(ids, kept) {
				t.Fatalf("after the gap %v, want what is held %v", ids, kept)
			}
		})
	}
}
