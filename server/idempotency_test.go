package server

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentstream/agentstream/server/container"
)

// dropProxy forwards connections to target, but for the first request it
// lets the server answer in full and then drops the connection without
// passing the answer on: the client cannot know that its batch was stored.
type dropProxy struct {
	ln      net.Listener
	target  string
	dropped atomic.Int32
}

func newDropProxy(t *testing.T, target string) *dropProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &dropProxy{ln: ln, target: target}
	go p.serve()
	t.Cleanup(func() { ln.Close() })
	return p
}

func (p *dropProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.handle(c)
	}
}

func (p *dropProxy) handle(c net.Conn) {
	defer c.Close()
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer s.Close()
	go io.Copy(s, c)
	if p.dropped.Add(1) == 1 {
		// Read the server's whole answer, then hang up on the client.
		resp, err := http.ReadResponse(bufio.NewReader(s), nil)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		return
	}
	io.Copy(c, s)
}

// TestRetryAfterLostResponseStoresOnce: run's and emit's client posts a
// batch through a proxy that drops the server's answer; it retries with
// the same Idempotency-Key, and the batch is stored exactly once.
func TestRetryAfterLostResponseStoresOnce(t *testing.T) {
	e := newEnv(t)
	p := newDropProxy(t, strings.TrimPrefix(e.base, "http://"))
	var retries int
	ic := &IngestClient{URL: "http://" + p.ln.Addr().String(), Token: e.agent, Rig: "r1",
		HTTP:    &http.Client{Transport: &http.Transport{DisableKeepAlives: true}},
		OnRetry: func(error, time.Duration) { retries++ }}
	batch := make([]container.Line, 50)
	for i := range batch {
		batch[i] = container.Line{Type: "step", Data: []byte(`{"i":1}`)}
	}
	if err := ic.Send(context.Background(), batch); err != nil {
		t.Fatal(err)
	}
	if retries == 0 || p.dropped.Load() < 2 {
		t.Fatalf("the proxy dropped nothing (retries %d, connections %d): the test proves nothing", retries, p.dropped.Load())
	}
	if got := e.rows(t, "agent_id = 'a1'"); got != 50 {
		t.Fatalf("stored %d events for one batch of 50 retried after a lost answer", got)
	}
}

// TestIdempotencyKey: a keyed retry gets the first ids and stores nothing;
// the same key with another body is 422; identical keyed requests at once
// store one batch and all get its ids; a bad key is 400.
func TestIdempotencyKey(t *testing.T) {
	e := newEnv(t)
	post := func(key, body string) (int, http.Header, []int64, string) {
		a := e.postKeyed(key, body)
		return a.code, a.header, a.ids, a.err
	}
	code, _, first, _ := post("batch-1", steps(3))
	if code != 201 || len(first) != 3 {
		t.Fatalf("first: %d %v", code, first)
	}
	before := e.snapshot()
	code, hdr, again, _ := post("batch-1", steps(3))
	if code != 201 || !slices.Equal(again, first) || hdr.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("retry: %d %v %q, want 201 %v replayed", code, again, hdr.Get("Idempotent-Replayed"), first)
	}
	if code, _, _, ec := post("batch-1", steps(4)); code != 422 || ec != "idempotency_key_reused" {
		t.Fatalf("same key, other body: %d %q", code, ec)
	}
	for _, bad := range []string{strings.Repeat("k", 129), "tab\there"} {
		if code, _, _, ec := post(bad, steps(1)); code != 400 || ec != "invalid_idempotency_key" {
			t.Fatalf("key %q: %d %q", bad, code, ec)
		}
	}
	if e.snapshot() != before {
		t.Fatal("a retry, a reused key or a bad key changed the store")
	}
	// Another agent's key of the same name is its own.
	other := e.mustMintAgent("t1", "r1", "a2")
	req, _ := http.NewRequest("POST", e.base+"/api/rigs/r1/agent-events", strings.NewReader(steps(3)))
	req.Header.Set("Authorization", "Bearer "+other)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", "batch-1")
	if resp, err := e.client.Do(req); err != nil || resp.StatusCode != 201 || resp.Header.Get("Idempotent-Replayed") != "" {
		t.Fatalf("another agent's key: %v %v", resp, err)
	}

	// Concurrent duplicates.
	const n = 6
	got := make([][]int64, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			code, _, ids, _ := post("batch-2", steps(5))
			if code != 201 {
				t.Errorf("concurrent %d: %d", i, code)
			}
			got[i] = ids
		})
	}
	wg.Wait()
	for i := range got {
		if !slices.Equal(got[i], got[0]) || len(got[i]) != 5 {
			t.Fatalf("concurrent duplicates got ids %v and %v", got[0], got[i])
		}
	}
	if rows := e.rows(t, "agent_id = 'a1'"); rows != 8 {
		t.Fatalf("a1 holds %d events; want 3 + one batch of 5", rows)
	}
}

// keyedAnswer is what a keyed post got.
type keyedAnswer struct {
	code   int
	header http.Header
	ids    []int64
	err    string // the error code, if any
}

// postKeyed posts body as a1 with an Idempotency-Key. It is safe from any
// goroutine: a failure to post is reported with t.Error.
func (e *testEnv) postKeyed(key, body string) keyedAnswer {
	req, _ := http.NewRequest("POST", e.base+"/api/rigs/r1/agent-events", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+e.agent)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Error(err)
		return keyedAnswer{}
	}
	defer resp.Body.Close()
	var v struct {
		IDs   []int64
		Error struct{ Code string }
	}
	jsonDecode(resp.Body, &v)
	return keyedAnswer{resp.StatusCode, resp.Header, v.IDs, v.Error.Code}
}
