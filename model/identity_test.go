package model

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Retention counts each town's agent on its own: another town's agent of
// the same id posting a lot prunes nothing of this one.
func TestRetentionPerTown(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{Retain: 10})
	acme := AgentKey{Town: "acme", Agent: "coder-1"}
	for i := range 5 {
		if err := s.Append(ctx, []Event{ev("acme", "rig-1", "coder-1", "x", i)}); err != nil {
			t.Fatal(err)
		}
	}
	batch := make([]Event, 200)
	for i := range batch {
		batch[i] = ev("beta", "rig-1", "coder-1", "x", i)
	}
	if err := s.Append(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := s.After(ctx, acme, 0, 100)
	if err != nil || len(got) != 5 {
		t.Fatalf("acme's coder-1 holds %d events after beta's posted 200 (err %v), want all 5", len(got), err)
	}
	if p, _ := s.PrunedThrough(ctx, acme); p != 0 {
		t.Fatalf("acme's coder-1 has a prune mark at %d; nothing of it was pruned", p)
	}
	beta := AgentKey{Town: "beta", Agent: "coder-1"}
	held, _ := s.After(ctx, beta, 0, 1000)
	mark, _ := s.PrunedThrough(ctx, beta)
	if len(held) != 10 || mark != held[0].ID-1 {
		t.Fatalf("beta's coder-1 holds %d events, mark %d; want 10, mark just below %d", len(held), mark, held[0].ID)
	}
	agents, _ := s.Agents(ctx, "acme")
	if len(agents) != 1 || agents[0].AgentID != "coder-1" {
		t.Fatalf("acme's agent list: %+v", agents)
	}
}

// The first event binds an agent to its rig; another rig of the town posting
// as it is refused, stores nothing, and does not hold up others in the
// same group commit.
func TestAgentBoundToFirstRig(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{})
	if err := s.Append(ctx, []Event{ev("acme", "rig-1", "coder-1", "x", 1)}); err != nil {
		t.Fatal(err)
	}
	err := s.Append(ctx, []Event{ev("acme", "rig-2", "coder-1", "x", 2), ev("acme", "rig-2", "coder-1", TypeExited, 3)})
	var rc *RigConflictError
	if !errors.As(err, &rc) || rc.Rig != "rig-1" || rc.Posted != "rig-2" {
		t.Fatalf("rig-2 posting as rig-1's coder-1: err %v, want a RigConflictError naming rig-1", err)
	}
	// The same agent id in another town, or in rig-2 under another id, is
	// another agent.
	if err := s.Append(ctx, []Event{ev("beta", "rig-2", "coder-1", "x", 4), ev("acme", "rig-2", "coder-2", "x", 5)}); err != nil {
		t.Fatal(err)
	}
	got, _ := s.After(ctx, AgentKey{Town: "acme", Agent: "coder-1"}, 0, 10)
	if len(got) != 1 || got[0].RigID != "rig-1" {
		t.Fatalf("acme/coder-1 holds %+v; want only rig-1's event", got)
	}
	if rig, _ := s.Rig(ctx, AgentKey{Town: "acme", Agent: "coder-1"}); rig != "rig-1" {
		t.Fatalf("Rig = %q", rig)
	}

	// Concurrent first posts from two rigs: one wins, the other is refused.
	errs := make(chan error, 2)
	for _, rig := range []string{"rig-a", "rig-b"} {
		go func() { errs <- s.Append(ctx, []Event{ev("acme", rig, "racer", "x", 1)}) }()
	}
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) {
		t.Fatalf("racing first posts from two rigs: errors %v and %v; want exactly one refused", e1, e2)
	}
	if n, _ := s.After(ctx, AgentKey{Town: "acme", Agent: "racer"}, 0, 10); len(n) != 1 {
		t.Fatalf("racer holds %d events, want 1", len(n))
	}
}

// A data file written before agents were bound to rigs (kept in testdata)
// opens, keeps its events, and comes out keyed by (town, agent).
//
// The file holds what the old version did: town beta's coder-1 posting
// pruned acme's coder-1 (retain 5, one mark for the agent id), and rig-2
// of acme posted as acme's coder-1 (id 12).
func TestMigrateIdentityFile(t *testing.T) {
	onlySQLite(t)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "old.db")
	copyFile(t, "../testdata/migrate/v20261125000004.db", path)
	s, err := Open(ctx, path, Options{Retain: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	ids := func(k AgentKey) []int64 {
		evs, err := s.After(ctx, k, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		var out []int64
		for _, e := range evs {
			out = append(out, e.ID)
		}
		return out
	}
	acme, beta := AgentKey{Town: "acme", Agent: "coder-1"}, AgentKey{Town: "beta", Agent: "coder-1"}
	if got := ids(acme); !slices.Equal(got, []int64{8, 12}) {
		t.Fatalf("acme/coder-1 ids %v, want [8 12]: no event is lost by the migration", got)
	}
	if got := ids(beta); !slices.Equal(got, []int64{9, 10, 11}) {
		t.Fatalf("beta/coder-1 ids %v", got)
	}
	// The old mark (7, for the agent id) now stands for both towns: the
	// old version pruned acme's events through 7.
	for _, k := range []AgentKey{acme, beta} {
		if m, _ := s.PrunedThrough(ctx, k); m != 7 {
			t.Fatalf("%s/%s mark %d, want 7", k.Town, k.Agent, m)
		}
	}
	// Bound to the rig of its first held event; rig-2 can post no more.
	if rig, _ := s.Rig(ctx, acme); rig != "rig-1" {
		t.Fatalf("acme/coder-1 bound to %q, want rig-1", rig)
	}
	var rc *RigConflictError
	if err := s.Append(ctx, []Event{ev("acme", "rig-2", "coder-1", "x", 1)}); !errors.As(err, &rc) {
		t.Fatalf("rig-2 posting as acme/coder-1 after the migration: %v", err)
	}
	// The agent list speaks of the agent's own rig's events.
	agents, err := s.Agents(ctx, "acme")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{"builder": 16, "reviewer": 14, "coder-1": 8}
	if len(agents) != len(want) {
		t.Fatalf("acme's agents: %+v", agents)
	}
	for _, a := range agents {
		if want[a.AgentID] != a.LastEventID || a.RigID != "rig-1" {
			t.Fatalf("acme's agents: %+v", agents)
		}
	}
	// Relay cursors and the ticket kept.
	if seq, _ := s.UpstreamSeq(ctx, AgentKey{Town: "acme", Agent: "builder"}, "run-a"); seq != 2 {
		t.Fatalf("relay cursor %d, want 2", seq)
	}
	// Retention now counts per town: beta posting prunes nothing of acme.
	s.Close()
	s, err = Open(ctx, path, Options{Retain: 3})
	if err != nil {
		t.Fatal(err)
	}
	batch := make([]Event, 50)
	for i := range batch {
		batch[i] = ev("beta", "rig-9", "coder-1", "x", i)
	}
	if err := s.Append(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	if got := ids(acme); !slices.Equal(got, []int64{8, 12}) {
		t.Fatalf("acme/coder-1 ids %v after beta posted 50 with retain 3", got)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// AfterBytes stops before the event that would take the data past its
// budget, but always returns one event when there is one.
func TestAfterBytes(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{})
	k := AgentKey{Town: "t", Agent: "a"}
	big := make([]Event, 6)
	for i := range big {
		big[i] = Event{TownID: "t", RigID: "r", AgentID: "a", Type: "x", Data: []byte(`"` + strings.Repeat("x", 1000) + `"`)}
	}
	if err := s.Append(ctx, big); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		budget int64
		want   int
	}{{10, 1}, {1002, 1}, {2004, 2}, {3500, 3}, {1 << 20, 6}} {
		got, err := s.AfterBytes(ctx, k, 0, 100, tc.budget)
		if err != nil || len(got) != tc.want || got[0].ID != big[0].ID {
			t.Fatalf("budget %d: %d events (err %v), want %d", tc.budget, len(got), err, tc.want)
		}
	}
	if got, _ := s.AfterBytes(ctx, k, big[5].ID, 100, 1<<20); len(got) != 0 {
		t.Fatalf("after the last: %d events", len(got))
	}
}
