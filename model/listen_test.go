package model

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"
)

// TestListen: on PostgreSQL one store hears another's commits, one
// notification per group commit naming its agents; after its LISTEN
// connection is killed it comes back by itself, says "any agent" (it may
// have missed some), and hears the next commits, but never its own.
// SQLite has no LISTEN.
func TestListen(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dsn := tempDSN(t)
	a, err := Open(ctx, dsn, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if current.Name == "sqlite" {
		if err := a.Listen(ctx, func([]AgentKey) {}); !errors.Is(err, ErrNoListen) {
			t.Fatalf("Listen on SQLite: %v, want ErrNoListen", err)
		}
		return
	}
	b, err := Open(ctx, dsn, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	heard := make(chan []AgentKey, 100)
	go b.Listen(ctx, func(keys []AgentKey) { heard <- keys })
	next := func(what string) []AgentKey {
		t.Helper()
		select {
		case keys := <-heard:
			return keys
		case <-time.After(30 * time.Second):
			t.Fatalf("nothing heard: %s", what)
			return nil
		}
	}
	if keys := next("the first connect"); keys != nil {
		t.Fatalf("first call %v, want nil (any agent)", keys)
	}
	if err := a.Append(ctx, []Event{ev("t", "r", "a1", "x", 1), ev("t", "r", "a2", "x", 2), ev("u", "r", "a1", "x", 3)}); err != nil {
		t.Fatal(err)
	}
	want := []AgentKey{{Town: "t", Agent: "a1"}, {Town: "t", Agent: "a2"}, {Town: "u", Agent: "a1"}}
	if keys := next("a commit"); !slices.Equal(keys, want) {
		t.Fatalf("heard %v, want %v", keys, want)
	}
	// Kill the listening connection from the server side.
	if _, err := a.DB().ExecContext(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"); err != nil {
		t.Fatal(err)
	}
	if keys := next("the reconnect"); keys != nil {
		t.Fatalf("after the reconnect %v, want nil (any agent)", keys)
	}
	if err := a.Append(ctx, []Event{ev("t", "r", "a1", "x", 4)}); err != nil {
		t.Fatal(err)
	}
	if keys := next("a commit after the reconnect"); !slices.Equal(keys, []AgentKey{{Town: "t", Agent: "a1"}}) {
		t.Fatalf("heard %v", keys)
	}
	// A store does not hear its own commits: they reach its feeds
	// through OnCommit.
	if err := b.Append(ctx, []Event{ev("t", "r", "own", "x", 5)}); err != nil {
		t.Fatal(err)
	}
	if err := a.Append(ctx, []Event{ev("t", "r", "a2", "x", 6)}); err != nil {
		t.Fatal(err)
	}
	if keys := next("a's commit after b's own"); !slices.Equal(keys, []AgentKey{{Town: "t", Agent: "a2"}}) {
		t.Fatalf("heard %v, want only a's commit", keys)
	}
}
