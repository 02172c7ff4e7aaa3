package server

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/gobwas/ws"

	"github.com/agentstream/agentstream/model"
)

// postAs posts events for an agent of rig r1 and returns their ids; it is
// safe from any goroutine.
func (e *testEnv) postAs(token, body string) ([]int64, error) { return e.postRigAs("r1", token, body) }

// postRigAs is postAs for an agent of rig.
func (e *testEnv) postRigAs(rig, token, body string) ([]int64, error) {
	req, _ := http.NewRequest("POST", e.base+"/api/rigs/"+rig+"/agent-events", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var v struct{ IDs []int64 }
	if err := jsonDecode(resp.Body, &v); err != nil || resp.StatusCode != 201 {
		return nil, fmt.Errorf("post: %d %v", resp.StatusCode, err)
	}
	return v.IDs, nil
}

func (e *testEnv) mustPost(token, body string) []int64 {
	e.t.Helper()
	ids, err := e.postAs(token, body)
	if err != nil {
		e.t.Fatal(err)
	}
	return ids
}

func steps(n int) string {
	evs := make([]string, n)
	for i := range evs {
		evs[i] = `{"type":"step","data":{"i":` + fmt.Sprint(i) + `}}`
	}
	return `{"events":[` + strings.Join(evs, ",") + `]}`
}

const exited = `{"type":"agent.exited","data":{"reason":"completed","exit_code":0}}`

// readN reads n events and returns their ids, failing on notices or
// errors.
func readN(t *testing.T, c streamClient, n int) []int64 {
	t.Helper()
	var ids []int64
	for _, m := range readMsgs(t, c, n) {
		if m.Notice != "" {
			t.Fatalf("unexpected notice %+v", m)
		}
		ids = append(ids, m.ID)
	}
	return ids
}

// TestStreamBackfillLiveEnd: on every transport, events posted before the
// stream opens (backfill) and after (live) arrive exactly once, in order;
// agent.exited ends the stream; a resume past it is refused at once.
func TestStreamBackfillLiveEnd(t *testing.T) {
	for _, kind := range transports {
		t.Run(kind, func(t *testing.T) { backfillLiveEnd(t, newEnv(t), kind) })
	}
	// Where the client's side is read on a goroutine per stream, not
	// through the Poller: systems without epoll.
	for _, kind := range []string{"sse-h1", "ws", "sse-h2c"} {
		t.Run(kind+"/no-poller", func(t *testing.T) {
			backfillLiveEnd(t, newEnvNoPoller(t, Options{}, model.Options{}), kind)
		})
	}
	// HTTP/2 left to net/http's server (--net-http2), where a stream
	// keeps its handler's goroutine.
	for _, kind := range []string{"sse-h2c", "sse-h2tls"} {
		t.Run(kind+"/net-http2", func(t *testing.T) {
			backfillLiveEnd(t, newEnvWith(t, Options{NetHTTP2: true}, model.Options{}), kind)
		})
	}
}

func backfillLiveEnd(t *testing.T, e *testEnv, kind string) {
	want := e.mustPost(e.agent, steps(5))
	c, code := e.open(kind, "a1", 0)
	if code != 200 && code != 101 {
		t.Fatalf("open: %d", code)
	}
	defer c.Close()
	got := readN(t, c, 5)
	want = append(want, e.mustPost(e.agent, steps(3))...)
	want = append(want, e.mustPost(e.agent, `{"type":"step"}`)...)
	got = append(got, readN(t, c, 4)...)
	want = append(want, e.mustPost(e.agent, exited)...)
	got = append(got, readN(t, c, 1)...)
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if _, err := c.Next(); err != io.EOF {
		t.Fatalf("after agent.exited: %v, want the stream to end", err)
	}
	// Resuming at or past agent.exited: 204 (SSE, NDJSON) or close 1000 (WS).
	c2, code := e.open(kind, "a1", want[len(want)-1])
	switch {
	case kind == "ws":
		if code != 101 {
			t.Fatalf("ws resume past exit: %d", code)
		}
		if cc, err := c2.(*wsClient).closeCode(); err != nil || cc != ws.StatusNormalClosure {
			t.Fatalf("ws resume past exit: close %d, %v", cc, err)
		}
		c2.Close()
	case code != http.StatusNoContent:
		t.Fatalf("resume past exit: %d, want 204", code)
	}
}

// TestStreamResume: 100 forced disconnects at random points on each
// transport while events flow; resuming with the last id seen, the union of
// what the client received is exactly the posted sequence.
func TestStreamResume(t *testing.T) {
	for _, kind := range transports {
		t.Run(kind, func(t *testing.T) {
			e := newEnvWith(t, Options{}, model.Options{Retain: -1}) // no gap from pruning here
			rng := rand.New(rand.NewPCG(1, uint64(len(kind))))
			var posted []int64
			var mu sync.Mutex
			done := make(chan error, 1)
			enough := make(chan struct{}) // closed after the 100th disconnect
			go func() {
				// Post until the client has disconnected 100 times (at most
				// 700 batches), then end the agent.
			post:
				for range 700 {
					select {
					case <-enough:
						break post
					default:
					}
					ids, err := e.postAs(e.agent, steps(1+rand.IntN(4)))
					if err != nil {
						done <- err
						return
					}
					mu.Lock()
					posted = append(posted, ids...)
					mu.Unlock()
				}
				ids, err := e.postAs(e.agent, exited)
				mu.Lock()
				posted = append(posted, ids...)
				mu.Unlock()
				done <- err
			}()
			var got []int64
			var cursor int64
			disconnects := 0
			for ended := false; !ended; {
				c, code := e.open(kind, "a1", cursor)
				if code == http.StatusNoContent {
					break
				}
				if c == nil {
					t.Fatalf("open: %d", code)
				}
				limit := 1 + rng.IntN(6)
				if disconnects >= 100 {
					limit = 1 << 30
				}
				for n := 0; n < limit; n++ {
					m, err := c.Next()
					if err == io.EOF {
						ended = true
						break
					}
					if err != nil || m.Notice != "" {
						t.Fatalf("read: %+v, %v", m, err)
					}
					got = append(got, m.ID)
					cursor = m.ID
				}
				c.Close()
				if !ended {
					if disconnects++; disconnects == 100 {
						close(enough)
					}
				}
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if disconnects < 100 {
				t.Fatalf("only %d disconnects", disconnects)
			}
			if !slices.Equal(got, posted) {
				t.Fatalf("received %d events, posted %d; first difference in %v vs %v", len(got), len(posted), got[:min(len(got), 10)], posted[:min(len(posted), 10)])
			}
		})
	}
}

// TestStreamWaitsForFirstEvent: a stream may open before the agent's first
// event; it waits, then gets it.
func TestStreamWaitsForFirstEvent(t *testing.T) {
	for _, kind := range transports {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t)
			c, code := e.open(kind, "a1", 0)
			if c == nil {
				t.Fatalf("open for an agent with no events: %d", code)
			}
			defer c.Close()
			want := e.mustPost(e.agent, `{"type":"session.created"}`)
			if got := readN(t, c, 1); !slices.Equal(got, want) {
				t.Fatalf("got %v, want %v", got, want)
			}
		})
	}
}

// TestStreamGapNotice: a cursor older than retention gets the gap notice,
// then the oldest retained event and the rest.
func TestStreamGapNotice(t *testing.T) {
	for _, kind := range transports {
		t.Run(kind, func(t *testing.T) {
			e := newEnvWith(t, Options{}, model.Options{Retain: 5})
			ids := e.mustPost(e.agent, steps(20))
			if err := e.store.Prune(context.Background()); err != nil {
				t.Fatal(err)
			}
			c, _ := e.open(kind, "a1", ids[2])
			defer c.Close()
			m, err := c.Next()
			if err != nil || m.Notice != "gap" || m.FirstID != ids[15] || m.After != ids[2] {
				t.Fatalf("first message %+v (%v), want a gap notice after %d with first_id %d", m, err, ids[2], ids[15])
			}
			if got := readN(t, c, 5); !slices.Equal(got, ids[15:]) {
				t.Fatalf("after the gap got %v, want %v", got, ids[15:])
			}
		})
	}
}
