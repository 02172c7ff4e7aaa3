package poll

import (
	"context"
	"slices"
	"testing"

	"github.com/agentstream/agentstream/model"
)

// TestBehind: Behind counts the subscriptions with more than N of their
// feed's events not yet finished with, the batch being written included,
// on agent and town feeds, and forgets a subscription once it is closed.
func TestBehind(t *testing.T) {
	e := newEnv(t, model.Options{Retain: -1}, Options{})
	ctx := context.Background()
	e.append(t, "a", "x", 5) // history before anyone subscribes
	latest, err := e.store.Latest(ctx, key("a"))
	if err != nil {
		t.Fatal(err)
	}
	keeper, err := e.sched.Subscribe(ctx, key("a"), latest)
	if err != nil {
		t.Fatal(err)
	}
	stalled, err := e.sched.Subscribe(ctx, key("a"), latest)
	if err != nil {
		t.Fatal(err)
	}
	town, err := e.sched.Subscribe(ctx, model.AgentKey{Town: "t"}, latest)
	if err != nil {
		t.Fatal(err)
	}
	check := func(want ...int) {
		t.Helper()
		if got := e.sched.Behind(10, 100, 1000); !slices.Equal(got, want) {
			t.Fatalf("Behind(10, 100, 1000) = %v, want %v", got, want)
		}
	}
	// The feeds start at the newest event: wait for that before adding.
	waitFor(t, "the agent's feed to start", func() bool { return e.feedCursor(key("a")) == latest })
	waitFor(t, "the town's feed to start", func() bool { return e.feedCursor(model.AgentKey{Town: "t"}) == latest })
	check(0, 0, 0)

	ids := e.append(t, "a", "x", 50)
	waitFor(t, "the agent's feed to read the 50", func() bool { return e.feedCursor(key("a")) == ids[49] })
	waitFor(t, "the town's feed to read the 50", func() bool { return e.feedCursor(model.AgentKey{Town: "t"}) == ids[49] })
	check(3, 0, 0)
	readAll(t, keeper, ids[49])
	check(2, 0, 0) // stalled and town

	ids = append(ids, e.append(t, "b", "x", 100)...) // b: the town's, not a's
	waitFor(t, "the town's feed to read b's", func() bool { return e.feedCursor(model.AgentKey{Town: "t"}) == ids[149] })
	check(2, 1, 0)

	// A taken batch is not finished with until the next TryNext.
	buf, err := town.TryNext(ctx, nil, 1000)
	if err != nil || len(buf) == 0 {
		t.Fatalf("town TryNext: %d items, %v", len(buf), err)
	}
	check(2, 1, 0)
	readAll(t, town, ids[149])
	check(1, 0, 0)

	stalled.Close()
	check(0, 0, 0)
}

// readAll reads sub through id, then calls TryNext once more, as a stream
// does after its write, to say it is done with the last batch.
func readAll(t *testing.T, sub *Subscription, through int64) {
	t.Helper()
	ctx := context.Background()
	var buf []*Item
	for sub.Cursor() < through {
		var err error
		if buf, err = sub.Next(ctx, buf, 7); err != nil {
			t.Fatal(err)
		}
	}
	if buf, err := sub.TryNext(ctx, buf, 7); err != nil || len(buf) > 0 {
		t.Fatalf("after %d: %d more items, %v", through, len(buf), err)
	}
}
