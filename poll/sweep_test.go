package poll

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
)

// countingSource is the store, counting the reads the scheduler makes.
type countingSource struct {
	*model.Store
	after, changed atomic.Int64
	mu             sync.Mutex
	afterBy        map[model.AgentKey]int // feed reads by key
}

func (c *countingSource) After(ctx context.Context, k model.AgentKey, afterID int64, limit int) ([]model.Event, error) {
	c.after.Add(1)
	c.mu.Lock()
	if c.afterBy == nil {
		c.afterBy = make(map[model.AgentKey]int)
	}
	c.afterBy[k]++
	c.mu.Unlock()
	return c.Store.After(ctx, k, afterID, limit)
}

// readsBy is a copy of the feed reads counted so far, by key.
func (c *countingSource) readsBy() map[model.AgentKey]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.afterBy)
}

func (c *countingSource) Changed(ctx context.Context, town string, afterID int64) (map[string]int64, error) {
	c.changed.Add(1)
	return c.Store.Changed(ctx, town, afterID)
}

// TestSweepOneReadPerTown: with 50 agents of one town followed and quiet,
// each interval costs one read for the town, not one per agent (a feed
// reads at most once, when the sweep first finds its town); when
// another writer (a second store on the database, whose commits no Notify
// reports) adds to two agents, the sweep wakes those two feeds and the
// town's, and their subscribers get the events.
func TestSweepOneReadPerTown(t *testing.T) {
	e := newEnv(t, model.Options{}, Options{})
	src := &countingSource{Store: e.store}
	sched := New(src, Options{Interval: 20 * time.Millisecond})
	t.Cleanup(sched.Close)
	ctx := context.Background()
	subs := make([]*Subscription, 50)
	for i := range subs {
		var err error
		if subs[i], err = sched.Subscribe(ctx, key(fmt.Sprint("a", i)), 0); err != nil {
			t.Fatal(err)
		}
	}
	town, err := sched.Subscribe(ctx, model.AgentKey{Town: "t"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The first sweep that finds the town has the feeds it finds read
	// once; feeds started later need no read (they start at the newest).
	waitFor(t, "ten sweeps", func() bool { return src.changed.Load() >= 10 })
	quiet := src.readsBy()
	for k, n := range quiet {
		if n > 1 {
			t.Fatalf("the feed of %v read %d times over ten sweeps of a quiet town; want at most once", k, n)
		}
	}

	other, err := model.Open(ctx, e.path, model.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	evs := []model.Event{
		{TownID: "t", RigID: "r", AgentID: "a7", Type: "remote", Data: json.RawMessage(`{}`)},
		{TownID: "t", RigID: "r", AgentID: "a31", Type: "remote", Data: json.RawMessage(`{}`)},
		{TownID: "u", RigID: "r", AgentID: "a7", Type: "remote", Data: json.RawMessage(`{}`)}, // another town's
	}
	if err := other.Append(ctx, evs); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		sub  *Subscription
		want []int64
	}{{subs[7], []int64{evs[0].ID}}, {subs[31], []int64{evs[1].ID}}, {town, []int64{evs[0].ID, evs[1].ID}}} {
		var got []int64
		var buf []*Item
		for len(got) < len(c.want) {
			if buf, err = c.sub.Next(ctx, buf, 10); err != nil {
				t.Fatal(err)
			}
			for _, it := range buf {
				got = append(got, it.ID)
			}
		}
		if !slices.Equal(got, c.want) {
			t.Fatalf("got %v, want %v", got, c.want)
		}
	}
	// Two agents' feeds and the town's read (again, if the sweep's poke
	// and the read cross); the 48 others not.
	waitFor(t, "two more sweeps", func() bool { return src.changed.Load() >= 12 })
	changed := map[model.AgentKey]bool{key("a7"): true, key("a31"): true, {Town: "t"}: true}
	for k, n := range src.readsBy() {
		if more := n - quiet[k]; changed[k] && more == 0 || !changed[k] && more != 0 {
			t.Fatalf("the feed of %v read %d more times after the other writer's commit", k, more)
		}
	}
}

// TestCommitsPushed: this process's commits reach the feeds without a
// read of the Source; and a commit of another writer that came between
// two of them (unseen: no notice, no sweep) is read, not skipped, so the
// subscribers of the agent and of the town get every event once, in order.
func TestCommitsPushed(t *testing.T) {
	e := newEnv(t, model.Options{Retain: -1}, Options{})
	src := &countingSource{Store: e.store}
	sched := New(src, Options{Interval: time.Hour})
	t.Cleanup(sched.Close)
	e.store.OnCommit(sched.Committed)
	ctx := context.Background()
	agent, err := sched.Subscribe(ctx, key("a"), 0)
	if err != nil {
		t.Fatal(err)
	}
	town, err := sched.Subscribe(ctx, model.AgentKey{Town: "t"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the feeds to start", func() bool {
		return sched.feedSynced(key("a")) >= 0 && sched.feedSynced(model.AgentKey{Town: "t"}) >= 0
	})
	var wantA, wantTown []int64
	for range 10 {
		ids := e.append(t, "a", "x", 3)
		wantA, wantTown = append(wantA, ids...), append(wantTown, ids...)
		wantTown = append(wantTown, e.append(t, "b", "x", 2)...)
	}
	readIDs(t, agent, wantA)
	readIDs(t, town, wantTown)
	if n := src.after.Load(); n != 0 {
		t.Fatalf("%d Source reads for this process's own commits; want 0", n)
	}

	other, err := model.Open(ctx, e.path, model.Options{Retain: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	unseen := []model.Event{{TownID: "t", RigID: "r", AgentID: "a", Type: "remote", Data: json.RawMessage(`{}`)}}
	if err := other.Append(ctx, unseen); err != nil {
		t.Fatal(err)
	}
	ids := e.append(t, "a", "x", 2)
	readIDs(t, agent, append([]int64{unseen[0].ID}, ids...))
	readIDs(t, town, append([]int64{unseen[0].ID}, ids...))
	if src.after.Load() == 0 {
		t.Fatal("the other writer's commit was not read")
	}
}

// readIDs reads from sub exactly the events want, in order.
func readIDs(t *testing.T, sub *Subscription, want []int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var got []int64
	var buf []*Item
	for len(got) < len(want) {
		var err error
		if buf, err = sub.Next(ctx, buf, 100); err != nil {
			t.Fatalf("after %d of %d: %v", len(got), len(want), err)
		}
		for _, it := range buf {
			got = append(got, it.ID)
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// feedSynced is the synced mark of k's feed, or -2 with no feed.
func (s *Scheduler) feedSynced(k model.AgentKey) int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if f := s.feeds[feedKey(k)]; f != nil {
		return f.synced.Load()
	}
	return -2
}
