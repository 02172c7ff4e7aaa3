package model

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"sync"
	"testing"
)

func openTemp(t testing.TB, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), tempDSN(t), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func ev(town, rig, agent, typ string, n int) Event {
	return Event{TownID: town, RigID: rig, AgentID: agent, Type: typ, Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, n))}
}

func TestAppendAfterRoundTrip(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{})
	batch := []Event{ev("t", "r", "a", "x.one", 1), ev("t", "r", "a", "x.two", 2), ev("t", "r", "b", "x.one", 3)}
	if err := s.Append(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if !(batch[0].ID > 0 && batch[1].ID == batch[0].ID+1 && batch[2].ID == batch[1].ID+1) {
		t.Fatalf("ids not consecutive in batch order: %d %d %d", batch[0].ID, batch[1].ID, batch[2].ID)
	}
	got, err := s.After(ctx, AgentKey{Town: "t", Agent: "a"}, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].ID != batch[0].ID || got[1].Type != "x.two" || string(got[1].Data) != `{"n":2}` {
		t.Fatalf("After = %+v", got)
	}
	if !got[0].CreatedAt.Equal(batch[0].CreatedAt) {
		t.Fatalf("created_at %v, want %v", got[0].CreatedAt, batch[0].CreatedAt)
	}
	// Another town never sees these events, even with the same agent id.
	other, err := s.After(ctx, AgentKey{Town: "u", Agent: "a"}, 0, 10)
	if err != nil || len(other) != 0 {
		t.Fatalf("other town read %d events, err %v", len(other), err)
	}
	agents, err := s.Agents(ctx, "t")
	if err != nil {
		t.Fatal(err)
	}
	if len(agents) != 2 || agents[0].AgentID != "b" || agents[1].AgentID != "a" || agents[1].LastType != "x.two" {
		t.Fatalf("Agents = %+v", agents)
	}
	// An exited agent's list entry says how it ended.
	exit := []Event{{TownID: "t", RigID: "r", AgentID: "a", Type: TypeExited, Data: json.RawMessage(`{"reason":"failed","exit_code":3}`)}}
	if err := s.Append(ctx, exit); err != nil {
		t.Fatal(err)
	}
	agents, err = s.Agents(ctx, "t")
	if err != nil {
		t.Fatal(err)
	}
	if a := agents[0]; a.AgentID != "a" || !a.Exited || a.ExitReason != "failed" || a.ExitCode == nil || *a.ExitCode != 3 {
		t.Fatalf("exited agent = %+v", a)
	}
}

// TestConcurrentAppendsAndPruning: 16 writers on 4 agents; every agent's ids
// strictly increase, none is lost, and pruning keeps the newest Retain with
// ids still increasing afterwards.
func TestConcurrentAppendsAndPruning(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{})
	const writers, perWriter = 16, 200 // 800 events per agent per round
	agents := []string{"a0", "a1", "a2", "a3"}
	round := func(base int) map[string][]int64 {
		var mu sync.Mutex
		acked := map[string][]int64{}
		var wg sync.WaitGroup
		for w := range writers {
			wg.Go(func() {
				agent := agents[w%len(agents)]
				for i := range perWriter {
					batch := []Event{ev("t", "r", agent, "step", base+i)}
					if i%10 == 0 { // some batches too
						batch = append(batch, ev("t", "r", agent, "step", base+i), ev("t", "r", agent, "step", base+i))
					}
					if err := s.Append(ctx, batch); err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					for _, e := range batch {
						acked[agent] = append(acked[agent], e.ID)
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		return acked
	}
	acked := round(0)
	for _, a := range agents {
		got := readAll(t, s, a)
		if len(got) != len(acked[a]) {
			t.Fatalf("%s: read %d events, acknowledged %d", a, len(got), len(acked[a]))
		}
		assertIncreasing(t, a, got)
		ids := map[int64]bool{}
		for _, e := range got {
			ids[e.ID] = true
		}
		for _, id := range acked[a] {
			if !ids[id] {
				t.Fatalf("%s: acknowledged id %d not read back", a, id)
			}
		}
	}
	// Two more rounds take every agent past DefaultRetain.
	round(1000)
	last := round(2000)
	if err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	for _, a := range agents {
		got := readAll(t, s, a)
		if len(got) != DefaultRetain {
			t.Fatalf("%s: %d events after pruning, want %d", a, len(got), DefaultRetain)
		}
		assertIncreasing(t, a, got)
		// The prune mark says where the deleted events end.
		mark, err := s.PrunedThrough(ctx, AgentKey{Town: "t", Agent: a})
		if err != nil || mark == 0 || mark >= got[0].ID {
			t.Fatalf("%s: pruned through %d (err %v), oldest kept %d", a, mark, err, got[0].ID)
		}
		maxAcked := int64(0)
		for _, id := range last[a] {
			maxAcked = max(maxAcked, id)
		}
		if got[len(got)-1].ID != maxAcked {
			t.Fatalf("%s: newest kept %d, newest acknowledged %d", a, got[len(got)-1].ID, maxAcked)
		}
		// Ids go on increasing after pruning: no id is reused.
		next := []Event{ev("t", "r", a, "after.prune", 0)}
		if err := s.Append(ctx, next); err != nil {
			t.Fatal(err)
		}
		if next[0].ID <= maxAcked {
			t.Fatalf("%s: id %d after pruning is not above %d", a, next[0].ID, maxAcked)
		}
	}
}

func TestIDsNeverReusedAfterPruningEverything(t *testing.T) {
	ctx := context.Background()
	path := tempDSN(t)
	s, err := Open(ctx, path, Options{Retain: 1})
	if err != nil {
		t.Fatal(err)
	}
	evs := []Event{ev("t", "r", "a", "x", 1), ev("t", "r", "a", "x", 2)}
	if err := s.Append(ctx, evs); err != nil {
		t.Fatal(err)
	}
	if err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DB().NewDelete().Model((*Event)(nil)).Where("1 = 1").Exec(ctx); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	next := []Event{ev("t", "r", "a", "x", 3)}
	if err := s.Append(ctx, next); err != nil {
		t.Fatal(err)
	}
	if next[0].ID <= evs[1].ID {
		t.Fatalf("id %d reused after the table was emptied (last was %d)", next[0].ID, evs[1].ID)
	}
}

func TestAppendAfterCloseFails(t *testing.T) {
	s := openTemp(t, Options{})
	s.Close()
	if err := s.Append(context.Background(), []Event{ev("t", "r", "a", "x", 1)}); err != ErrClosed {
		t.Fatalf("Append after Close: %v, want ErrClosed", err)
	}
}

func readAll(t *testing.T, s *Store, agent string) []Event {
	t.Helper()
	var all []Event
	var after int64
	for {
		evs, err := s.After(context.Background(), AgentKey{Town: "t", Agent: agent}, after, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) == 0 {
			return all
		}
		all = append(all, evs...)
		after = evs[len(evs)-1].ID
	}
}

func assertIncreasing(t *testing.T, agent string, evs []Event) {
	t.Helper()
	for i := 1; i < len(evs); i++ {
		if evs[i].ID <= evs[i-1].ID {
			t.Fatalf("%s: id %d follows %d", agent, evs[i].ID, evs[i-1].ID)
		}
	}
}

// TestRelayedStoredOnce: an upstream event is stored once per (town,
// agent, run, seq), however often it is appended.
func TestRelayedStoredOnce(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{})
	k := AgentKey{Town: "t", Agent: "a"}
	relayed := func(run string, seq int64) Event {
		e := ev("t", "r", "a", "x.relayed", int(seq))
		e.UpstreamRun, e.UpstreamSeq = run, seq
		return e
	}
	if err := s.Append(ctx, []Event{ev("t", "r", "a", "x.local", 0), relayed("run1", 1), relayed("run1", 2), relayed("run2", 1)}); err != nil {
		t.Fatal(err)
	}
	for run, want := range map[string]int64{"run1": 2, "run2": 1, "run3": 0} {
		if got, err := s.UpstreamSeq(ctx, k, run); err != nil || got != want {
			t.Errorf("UpstreamSeq(%s) = %d, %v; want %d", run, got, err, want)
		}
	}
	// Relayed events already stored are skipped, keeping ID 0; the new
	// one of the same call is stored.
	again := []Event{relayed("run1", 2), relayed("run1", 3), relayed("run2", 1)}
	again[0].ID, again[2].ID = 99, 99
	if err := s.Append(ctx, again); err != nil {
		t.Fatal(err)
	}
	if again[0].ID != 0 || again[1].ID == 0 || again[2].ID != 0 {
		t.Fatalf("ids after the append %d %d %d, want 0, an id, 0", again[0].ID, again[1].ID, again[2].ID)
	}
	if got, _ := s.UpstreamSeq(ctx, k, "run1"); got != 3 {
		t.Fatalf("UpstreamSeq(run1) = %d, want 3", got)
	}
	// Local events never clash with one another.
	if err := s.Append(ctx, []Event{ev("t", "r", "a", "x.local", 1), ev("t", "r", "a", "x.local", 2)}); err != nil {
		t.Fatal(err)
	}
	got, err := s.After(ctx, k, 0, 100)
	if err != nil || len(got) != 7 || got[1].UpstreamRun != "run1" || got[1].UpstreamSeq != 1 || got[4].UpstreamSeq != 3 {
		t.Fatalf("After = %+v, %v", got, err)
	}
}

// TestRelayedRace: two stores on one database (as two instances' relays
// pulling one container are) append the same upstream events at once, in
// pages that overlap, while other callers append local events alongside.
// Every call succeeds, and each upstream event is stored once, in order.
func TestRelayedRace(t *testing.T) {
	ctx := context.Background()
	stores := twoStores(t)
	const last = 300
	var wg sync.WaitGroup
	for w, s := range stores {
		wg.Go(func() {
			// Pages of 1 to 7 from where this relay last stored: each
			// page overlaps what the other relay may have stored.
			for seq := int64(1); seq <= last; {
				n := int64(1 + (int(seq)+w)%7)
				var page []Event
				for i := seq; i < seq+n && i <= last; i++ {
					e := ev("t", "r", "a", "x.relayed", int(i))
					e.UpstreamRun, e.UpstreamSeq = "run1", i
					page = append(page, e)
				}
				if err := s.Append(ctx, page); err != nil {
					t.Errorf("relay %d, page from %d: %v", w, seq, err)
					return
				}
				seq += n
			}
		})
		wg.Go(func() {
			for i := range 100 {
				if err := s.Append(ctx, []Event{ev("t", "r", "local", "x", i)}); err != nil {
					t.Errorf("local append %d beside the relays: %v", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	got, err := stores[0].After(ctx, AgentKey{Town: "t", Agent: "a"}, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != last {
		t.Fatalf("%d upstream events stored, want %d", len(got), last)
	}
	for i, e := range got {
		if e.UpstreamSeq != int64(i+1) {
			t.Fatalf("event %d has upstream seq %d", i, e.UpstreamSeq)
		}
	}
}

// TestChanged: Changed names the agents of one town with events after an
// id, once each, with the highest id among them, and nothing of another
// town's.
func TestChanged(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t, Options{})
	first := []Event{ev("t", "r", "a", "x", 1), ev("t", "r", "b", "x", 2), ev("u", "r", "a", "x", 3)}
	if err := s.Append(ctx, first); err != nil {
		t.Fatal(err)
	}
	mark := first[2].ID
	later := []Event{ev("t", "r", "b", "x", 4), ev("u", "r", "c", "x", 5), ev("t", "r", "b", "x", 6), ev("t", "r", "d", "x", 7)}
	if err := s.Append(ctx, later); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		town  string
		after int64
		want  map[string]int64
	}{
		{"t", mark, map[string]int64{"b": later[2].ID, "d": later[3].ID}},
		{"t", later[3].ID, map[string]int64{}},
		{"u", 0, map[string]int64{"a": first[2].ID, "c": later[1].ID}},
	} {
		got, err := s.Changed(ctx, c.town, c.after)
		if err != nil || !maps.Equal(got, c.want) {
			t.Fatalf("Changed(%s, %d) = %v, %v; want %v", c.town, c.after, got, err, c.want)
		}
	}
}
