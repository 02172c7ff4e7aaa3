package server

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
)

// townAgents are the agents the town stream tests post as: two rigs.
var townAgents = []struct{ rig, agent string }{{"r1", "a1"}, {"r1", "a2"}, {"r2", "b1"}}

// townEvents is every event the store holds for town t1, in id order.
func (e *testEnv) townEvents(t *testing.T) []model.Event {
	t.Helper()
	evs, err := e.store.After(context.Background(), model.AgentKey{Town: "t1"}, 0, 100000)
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

func eventIDs(evs []model.Event) []int64 {
	ids := make([]int64, len(evs))
	for i := range evs {
		ids[i] = evs[i].ID
	}
	return ids
}

// readMsgs reads n messages, events or notices, failing on errors (the
// end of the stream included: a town stream never ends by itself).
func readMsgs(t *testing.T, c streamClient, n int) []msg {
	t.Helper()
	var got []msg
	for len(got) < n {
		m, err := c.Next()
		if err != nil {
			t.Fatalf("after %d of %d messages: %v", len(got), n, err)
		}
		got = append(got, m)
	}
	return got
}

// TestTownStream: on every transport, three agents of two rigs post
// concurrently, one of them exits halfway, while a watcher of the town's
// stream is cut off twenty times at random points and resumes with its last
// id; then the server restarts and the watcher resumes on the new one. It
// receives every event of the town exactly once, in id order — the exits
// included, which do not end the stream.
func TestTownStream(t *testing.T) {
	for _, kind := range transports {
		t.Run(kind, func(t *testing.T) {
			dsn := current.DSN(t)
			e := newEnvOn(t, dsn, Options{}, model.Options{Retain: -1}, poll.Options{})
			var writers sync.WaitGroup
			for i, a := range townAgents {
				tok := e.mustMintAgent("t1", a.rig, a.agent)
				writers.Go(func() {
					for j := range 30 {
						body := steps(1 + (i+j)%3)
						if a.agent == "a1" && j == 15 {
							body = exited
						}
						if _, err := e.postRigAs(a.rig, tok, body); err != nil {
							t.Error(err)
							return
						}
					}
				})
			}
			rng := rand.New(rand.NewPCG(2, uint64(len(kind))))
			var got []int64
			var cursor int64
			read := func(e *testEnv, n int) {
				if n == 0 {
					return
				}
				c, code := e.openTown(kind, "", cursor)
				if c == nil {
					t.Fatalf("open: %d", code)
				}
				defer c.Close()
				ids := readN(t, c, n)
				got = append(got, ids...)
				cursor = ids[len(ids)-1]
			}
			for range 20 {
				read(e, 1+rng.IntN(6))
			}
			writers.Wait()
			e.stop()
			e = newEnvOn(t, dsn, Options{}, model.Options{Retain: -1}, poll.Options{})
			want := eventIDs(e.townEvents(t))
			read(e, len(want)-len(got))
			if !slices.Equal(got, want) {
				t.Fatalf("received %d events, the town holds %d; first ids %v vs %v", len(got), len(want), got[:min(len(got), 8)], want[:min(len(want), 8)])
			}
		})
	}
}

// TestTownStreamFilters: ?rig=, ?agent= (repeated) and ?types= (prefixes)
// narrow the town's stream to what they name, backfill and live; a filter
// that is not well formed is refused with 400 before the ticket is used.
func TestTownStreamFilters(t *testing.T) {
	e := newEnv(t)
	e.postRig("r1", "a1", steps(3))
	e.postRig("r1", "a2", `{"events":[{"type":"message.part.updated","data":{"delta":"hi"}},{"type":"message.updated"}]}`)
	e.postRig("r2", "b1", `{"events":[{"type":"step"},{"type":"tool.call"},{"type":"stepped"}]}`)
	e.postRig("r1", "a1", exited)
	for _, tc := range []struct {
		query   string
		passes  func(model.Event) bool
		out, in [3]string // rig, agent and type of a live event it leaves out, and of one it passes
	}{
		{"rig=r2", func(ev model.Event) bool { return ev.RigID == "r2" },
			[3]string{"r1", "a2", "later"}, [3]string{"r2", "b1", "later"}},
		{"agent=a1&agent=a2", func(ev model.Event) bool { return ev.AgentID != "b1" },
			[3]string{"r2", "b1", "later"}, [3]string{"r1", "a2", "later"}},
		{"types=message.,agent.", func(ev model.Event) bool {
			return strings.HasPrefix(ev.Type, "message.") || strings.HasPrefix(ev.Type, "agent.")
		}, [3]string{"r2", "b1", "messages"}, [3]string{"r2", "b1", "message.updated"}},
		{"rig=r2&types=step", func(ev model.Event) bool { return ev.RigID == "r2" && strings.HasPrefix(ev.Type, "step") },
			[3]string{"r1", "a2", "step"}, [3]string{"r2", "b1", "step"}},
	} {
		for _, kind := range transports {
			t.Run(kind+"/"+tc.query, func(t *testing.T) {
				var want []int64
				for _, ev := range e.townEvents(t) { // earlier subtests' live events too
					if tc.passes(ev) {
						want = append(want, ev.ID)
					}
				}
				c, code := e.openTown(kind, tc.query, 0)
				if c == nil {
					t.Fatalf("open: %d", code)
				}
				defer c.Close()
				got := readN(t, c, len(want))
				// Live: an event the filter leaves out, then one it lets
				// through, which must be the next thing the client sees.
				e.postRig(tc.out[0], tc.out[1], fmt.Sprintf(`{"type":%q}`, tc.out[2]))
				want = append(want, e.postRig(tc.in[0], tc.in[1], fmt.Sprintf(`{"type":%q}`, tc.in[2]))...)
				got = append(got, readN(t, c, 1)...)
				if !slices.Equal(got, want) {
					t.Fatalf("got %v, want %v", got, want)
				}
			})
		}
	}

	path := e.townTicket()
	for _, bad := range []struct{ query, code string }{
		{"types=Step!", "invalid_filter"},
		{"agent=" + strings.Repeat("x", 200), "invalid_agent_id"},
		{"rig=a%20b", "invalid_rig_id"},
		{"agent=" + strings.Repeat("a&agent=", 100) + "a", "invalid_filter"},
	} {
		code, body := e.get(path+"&"+bad.query, nil)
		if code != 400 || !strings.Contains(body, bad.code) {
			t.Errorf("?%.40s: %d %s, want 400 %s", bad.query, code, body, bad.code)
		}
	}
	// An agent's stream has no rig or agent filter.
	agentPath := e.ticket("a1")
	if code, body := e.get(agentPath+"&agent=a2", nil); code != 400 || !strings.Contains(body, "invalid_filter") {
		t.Errorf("agent stream with ?agent=: %d %s, want 400 invalid_filter", code, body)
	}
	// The refusals used up no ticket.
	for _, p := range []string{path, agentPath} {
		c, code := e.openPath("sse-h1", p, 0, nil)
		if c == nil {
			t.Fatalf("ticket after the refusals: %d", code)
		}
		c.Close()
	}
}

// TestTownStreamGaps: on every transport, retention has pruned two of the
// town's agents past the watcher's cursor. The watcher gets one gap notice
// per pruned agent, naming it, with the agent's oldest held id, before any
// event; then every event the town still holds, once. A filter leaves out
// the notices of the agents it leaves out.
func TestTownStreamGaps(t *testing.T) {
	for _, kind := range transports {
		t.Run(kind, func(t *testing.T) {
			e := newEnvWith(t, Options{}, model.Options{Retain: 5})
			e.postRig("r1", "a1", steps(20))
			e.postRig("r2", "b1", steps(3))
			e.postRig("r1", "a2", steps(12))
			if err := e.store.Prune(context.Background()); err != nil {
				t.Fatal(err)
			}
			held := e.townEvents(t)
			oldest := map[string]int64{}
			for _, ev := range held {
				if oldest[ev.AgentID] == 0 {
					oldest[ev.AgentID] = ev.ID
				}
			}
			c, _ := e.openTown(kind, "", 0)
			defer c.Close()
			got := readMsgs(t, c, 2+len(held))
			notices := map[string]msg{}
			for _, m := range got[:2] {
				if m.Notice != "gap" || m.After != 0 {
					t.Fatalf("first messages %+v, want two gap notices", got[:2])
				}
				notices[m.Agent] = m
			}
			for _, a := range []string{"a1", "a2"} {
				if m, ok := notices[a]; !ok || m.FirstID != oldest[a] {
					t.Fatalf("gap notices %+v, want one for %s with first_id %d", notices, a, oldest[a])
				}
			}
			var ids []int64
			for _, m := range got[2:] {
				ids = append(ids, m.ID)
			}
			if !slices.Equal(ids, eventIDs(held)) {
				t.Fatalf("after the notices got %v, want %v", ids, eventIDs(held))
			}

			f, _ := e.openTown(kind, "agent=a2&agent=b1", 0)
			defer f.Close()
			if m := readMsgs(t, f, 1)[0]; m.Notice != "gap" || m.Agent != "a2" {
				t.Fatalf("filtered to a2 and b1: first message %+v, want a2's gap notice", m)
			}
			if m := readMsgs(t, f, 1)[0]; m.Notice != "" || m.AgentID == "a1" {
				t.Fatalf("filtered to a2 and b1: second message %+v, want an event of theirs", m)
			}
		})
	}
}

// TestTownTicket: a town ticket opens the town's stream once, and no
// agent's; an agent's ticket does not open the town's stream.
func TestTownTicket(t *testing.T) {
	e := newEnv(t)
	e.postRig("r1", "a1", steps(1))
	town := e.townTicket()
	tk := town[strings.Index(town, "ticket=")+len("ticket="):]
	if code, _ := e.get("/api/towns/t1/container/agents/a1/stream?ticket="+tk, nil); code != http.StatusUnauthorized {
		t.Fatalf("a town ticket on an agent's stream: %d, want 401", code)
	}
	agent := e.ticket("a1")
	atk := agent[strings.Index(agent, "ticket=")+len("ticket="):]
	if code, _ := e.get("/api/towns/t1/stream?ticket="+atk, nil); code != http.StatusUnauthorized {
		t.Fatalf("an agent's ticket on the town's stream: %d, want 401", code)
	}
	c, code := e.openPath("sse-h1", town, 0, nil)
	if c == nil {
		t.Fatalf("town ticket: %d", code)
	}
	readN(t, c, 1)
	c.Close()
	if _, code := e.openPath("sse-h1", town, 0, nil); code != http.StatusUnauthorized {
		t.Fatalf("the town ticket again: %d, want 401", code)
	}
	// A viewer token of another town opens nothing here.
	other, _ := e.auth.MintViewer("t2", time.Hour)
	if code, _, _ := e.do("POST", "/api/towns/t1/stream-ticket", other, "", nil); code != http.StatusForbidden {
		t.Fatalf("another town's viewer asking for t1's ticket: %d, want 403", code)
	}
}
