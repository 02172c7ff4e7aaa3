package server

import (
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/server/container"
)

// twoInstances is two servers on one PostgreSQL database. Their feeds poll
// once an hour: what one instance's commits bring to the other's streams
// comes through LISTEN/NOTIFY.
func twoInstances(t *testing.T) (a, b *testEnv) {
	dsn := pgDSN(t)
	return newEnvOn(t, dsn, Options{}, zeroStore(), pollHourly()), newEnvOn(t, dsn, Options{}, zeroStore(), pollHourly())
}

// TestCrossInstanceDelivery: events posted to instance A reach streams open
// on instance B at once, on every transport, and the other way round.
func TestCrossInstanceDelivery(t *testing.T) {
	a, b := twoInstances(t)
	for _, kind := range []string{"sse-h1", "sse-h2c", "ws", "ndjson"} {
		t.Run(kind, func(t *testing.T) {
			last := a.mustPost(a.agent, `{"type":"session.created"}`)[0]
			onB, code := b.open(kind, "a1", last)
			if onB == nil {
				t.Fatalf("open on B: %d", code)
			}
			defer onB.Close()
			onA, code := a.open(kind, "a1", last)
			if onA == nil {
				t.Fatalf("open on A: %d", code)
			}
			defer onA.Close()
			fromA := a.mustPost(a.agent, steps(3))
			fromB := b.mustPost(b.agent, steps(2))
			want := append(fromA, fromB...)
			for name, c := range map[string]streamClient{"B": onB, "A": onA} {
				if got := readN(t, c, 5); !slices.Equal(got, want) {
					t.Fatalf("stream on %s got %v, want %v", name, got, want)
				}
			}
		})
	}
}

// TestTicketAcrossInstances: a ticket minted on A redeems on B, and of
// two redeems at once, one on each instance, exactly one opens a stream.
func TestTicketAcrossInstances(t *testing.T) {
	a, b := twoInstances(t)
	a.mustPost(a.agent, steps(1))
	for range 5 {
		path := a.ticket("a1")
		codes := make([]int, 2)
		var wg sync.WaitGroup
		for i, e := range []*testEnv{a, b} {
			wg.Go(func() {
				c, code := e.openPath("sse-h1", path, 0, nil)
				if c != nil {
					c.Close()
				}
				codes[i] = code
			})
		}
		wg.Wait()
		slices.Sort(codes)
		if codes[0] != 200 || codes[1] != 401 {
			t.Fatalf("one ticket redeemed on both instances at once: %v, want one 200 and one 401", codes)
		}
	}
	if c, code := b.openPath("sse-h1", a.ticket("a1"), 0, nil); c == nil {
		t.Fatalf("a ticket of A on B: %d", code)
	} else {
		c.Close()
	}
}

// TestResumeOnOtherInstance: a client that read part of a stream on A and
// reconnects to B with its last id gets the rest exactly once; an
// Idempotency-Key used on A replays on B.
func TestResumeOnOtherInstance(t *testing.T) {
	a, b := twoInstances(t)
	ids := a.mustPost(a.agent, steps(10))
	c, _ := a.open("sse-h1", "a1", 0)
	got := readN(t, c, 4)
	c.Close()
	more := b.mustPost(b.agent, steps(3))
	c, _ = b.open("sse-h1", "a1", got[len(got)-1])
	defer c.Close()
	got = append(got, readN(t, c, 9)...)
	if want := append(ids, more...); !slices.Equal(got, want) {
		t.Fatalf("across the reconnect: %v, want %v", got, want)
	}

	first, again := a.postKeyed("batch-1", steps(2)), b.postKeyed("batch-1", steps(2))
	if first.code != 201 || again.code != 201 || !slices.Equal(first.ids, again.ids) {
		t.Fatalf("a key used on A, retried on B: %+v, %+v", first, again)
	}
}

func pollHourly() poll.Options { return poll.Options{Interval: time.Hour} }

func zeroStore() model.Options { return model.Options{} }

// TestTwoRelaysStoreOnce: two instances on one PostgreSQL database, both
// with --upstream to the same container, pull the same agents at once;
// each agent's events are stored once each, in order, and both instances
// serve them. Neither logs an error: an event the other instance stored
// first is no failure.
func TestTwoRelaysStoreOnce(t *testing.T) {
	onlyPostgres(t)
	e := newUpstreamEnv(t, container.Options{})
	e.interval = 10 * time.Millisecond // both pull at every tick: they clash often
	var errs errorLog
	e.log = slog.New(&errs)
	e.serve()
	other, stop := e.start("127.0.0.1:0")
	defer stop()
	agents := []string{"a1", "a2", "a3"}
	for _, id := range agents {
		e.startAgent(id, "sh", testScript(t, "paced.sh"), "100", "0.002")
	}
	first := e.addr
	for _, id := range agents {
		waitUntil(t, id+" stored to its exit", func() bool {
			evs := e.stored(id)
			return len(evs) > 0 && evs[len(evs)-1].Type == model.TypeExited
		})
		checkRelayed(t, e.stored(id), 100, "completed")
		e.addr = other
		checkRelayed(t, e.stored(id), 100, "completed")
		e.addr = first
	}
	if got := errs.records(); len(got) > 0 {
		t.Fatalf("%d errors logged, first: %s", len(got), got[0])
	}
}

// TestTownStreamAcrossInstances: agents of one town post to instance A
// and to instance B at once, while a watcher follows the town's stream on
// B, then resumes it on A: it gets every event of the town once, in id
// order (the per-town lock orders the two instances' commits).
func TestTownStreamAcrossInstances(t *testing.T) {
	a, b := twoInstances(t)
	var writers sync.WaitGroup
	for i, ta := range townAgents {
		on := []*testEnv{a, b}[i%2]
		tok := on.mustMintAgent("t1", ta.rig, ta.agent)
		writers.Go(func() {
			for j := range 40 {
				if _, err := on.postRigAs(ta.rig, tok, steps(1+j%3)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	c, _ := b.openTown("sse-h1", "", 0)
	got := readN(t, c, 60)
	c.Close()
	writers.Wait()
	want := eventIDs(a.townEvents(t))
	c, _ = a.openTown("ws", "", got[len(got)-1])
	defer c.Close()
	got = append(got, readN(t, c, len(want)-len(got))...)
	if !slices.Equal(got, want) {
		t.Fatalf("received %d events, the town holds %d", len(got), len(want))
	}
}
