package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/server/container"
	"github.com/agentstream/agentstream/transport"
)

// TestStreamCapKeepsAPIAnswering fills a town's stream cap with streams on
// every transport (HTTP/2 streams count too) and shows that the next
// stream is refused with 429 too_many_streams and Retry-After, without
// using up its ticket, while ingest, /healthz, /readyz and other towns
// still answer; a slot freed is a stream opened.
func TestStreamCapKeepsAPIAnswering(t *testing.T) {
	e := newEnvWith(t, Options{Limits: Limits{StreamsPerTown: 3}}, model.Options{})
	e.mustPost(e.agent, steps(2))
	var open []streamClient
	for _, kind := range []string{"sse-h1", "sse-h2c", "ws"} {
		c, code := e.open(kind, "a1", 0)
		if c == nil {
			t.Fatalf("%s within the cap: %d", kind, code)
		}
		readN(t, c, 2)
		open = append(open, c)
	}
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	ticket := e.ticket("a1")
	for _, kind := range []string{"sse-h1", "sse-h2c", "ws"} {
		if c, code := e.openPath(kind, ticket, 0, nil); c != nil || code != 429 {
			t.Fatalf("%s past the cap: %d, want 429", kind, code)
		}
	}
	code, hdr, v := e.do("GET", "/api/towns/t1/container/agents/a1/stream", e.viewer, "", nil)
	if code != 429 || errCode(v) != "too_many_streams" || hdr.Get("Retry-After") == "" {
		t.Fatalf("past the cap: %d %v Retry-After %q", code, v, hdr.Get("Retry-After"))
	}
	// Everything else still answers, on fresh connections.
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := fresh.Get(e.base + path)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s at the stream cap: %v %v", path, resp, err)
		}
		resp.Body.Close()
	}
	ids := e.mustPost(e.agent, `{"type":"step"}`)
	if m, err := open[0].Next(); err != nil || m.ID != ids[0] {
		t.Fatalf("a stream within the cap missed a live event: %+v %v", m, err)
	}
	newViewerStream(t, e, "t2")
	// A slot freed: the refused ticket opens a stream now.
	open[0].Close()
	open = open[1:]
	waitUntil(t, "the closed stream's slot", func() bool {
		e.api.townStrs.mu.Lock()
		defer e.api.townStrs.mu.Unlock()
		return e.api.townStrs.n["t1"] == 2
	})
	c, code := e.openPath("sse-h1", ticket, 0, nil)
	if c == nil {
		t.Fatalf("the ticket refused at the cap does not open a stream later: %d", code)
	}
	open = append(open, c)
}

// newViewerStream opens an SSE stream of agent a1 in town with a viewer
// token of that town.
func newViewerStream(t *testing.T, e *testEnv, town string) *http.Response {
	t.Helper()
	tok, _ := e.auth.MintViewer(town, time.Hour)
	req, _ := http.NewRequest("GET", e.base+"/api/towns/"+town+"/container/agents/a1/stream", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := e.client.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("a stream of town %s while t1 is at its cap: %v %v", town, resp, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// TestConnectionCap: past the cap a connection is answered 503 and closed
// at once, not queued; connections taken over by streams count until they
// close.
func TestConnectionCap(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(1))
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := transport.NewLimitListener(tcp, 2, connRefusal)
	hs := newHTTPServer(e.api, slog.New(slog.DiscardHandler), 0, 0)
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	base := "http://" + tcp.Addr().String()

	// Two SSE streams on HTTP/1.1: both connections are hijacked.
	var streams []*http.Response
	for range 2 {
		req, _ := http.NewRequest("GET", base+"/api/towns/t1/container/agents/a1/stream", nil)
		req.Header.Set("Authorization", "Bearer "+e.viewer)
		resp, err := (&http.Client{Transport: &http.Transport{}}).Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("stream within the cap: %v %v", resp, err)
		}
		streams = append(streams, resp)
	}
	status := func() string {
		c, err := net.Dial("tcp", tcp.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatalf("no answer: %v", err)
		}
		return strings.TrimSpace(line)
	}
	if got := status(); !strings.HasPrefix(got, "HTTP/1.1 503") {
		t.Fatalf("past the cap: %q, want 503", got)
	}
	streams[0].Body.Close()
	waitUntil(t, "the stream's connection to be given back", func() bool { return ln.Open() < 2 })
	if got := status(); !strings.HasPrefix(got, "HTTP/1.1 200") {
		t.Fatalf("after a stream closed: %q, want 200", got)
	}
	streams[1].Body.Close()
}

// TestSlowRequestsTimedOut: a request that announces a body and never
// sends it, or trickles it, does not hold its connection: a GET that uses
// no body is answered and its connection closed at once, an ingest body
// that does not arrive within the body timeout gets 408.
func TestSlowRequestsTimedOut(t *testing.T) {
	e := newEnvWith(t, Options{Limits: Limits{BodyTimeout: 300 * time.Millisecond}}, model.Options{})
	addr := strings.TrimPrefix(e.base, "http://")
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		return c, bufio.NewReader(c)
	}
	for _, path := range []string{"/healthz", "/readyz", "/api/towns/t1/agents"} {
		c, r := dial()
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 1000\r\n\r\n", path, e.viewer)
		resp, err := http.ReadResponse(r, nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s announcing an unsent body: %v %v", path, resp, err)
		}
		io.Copy(io.Discard, resp.Body)
		if _, err := r.ReadByte(); err != io.EOF {
			t.Fatalf("GET %s: connection left open (%v)", path, err)
		}
	}

	// A POST trickling one byte every 50 ms.
	c, r := dial()
	body := `{"type":"step","data":{"pad":"` + strings.Repeat("x", 200) + `"}}`
	fmt.Fprintf(c, "POST /api/rigs/r1/agent-events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", e.agent, len(body))
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for i := range len(body) {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if _, err := c.Write([]byte{body[i]}); err != nil {
				return
			}
		}
	}()
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	jsonDecode(resp.Body, &v)
	if resp.StatusCode != 408 || errCode(v) != "body_timeout" {
		t.Fatalf("trickled POST: %d %v, want 408 body_timeout", resp.StatusCode, v)
	}
	if got := e.rows(t, "1=1"); got != 0 {
		t.Fatalf("%d events stored from a body that never arrived", got)
	}
}

// TestIngestRateLimit: an agent past its rate gets 429 with Retry-After and
// stores nothing; another agent is unaffected; agentstream's own client
// waits as long as Retry-After says and then gets through.
func TestIngestRateLimit(t *testing.T) {
	// The limiter's clock stands still unless the test moves it: what it
	// refuses does not depend on how fast this machine runs the test.
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	now := func() time.Time { return time.Unix(0, clock.Load()) }
	e := newEnvWith(t, Options{Now: now, Limits: Limits{IngestEvents: 1000, IngestEventBurst: 1000}}, model.Options{})
	e.mustPost(e.agent, steps(1000))
	before := e.snapshot()
	code, hdr, v := e.do("POST", "/api/rigs/r1/agent-events", e.agent, "application/json", []byte(steps(100)))
	if code != 429 || errCode(v) != "rate_limited" {
		t.Fatalf("past the rate: %d %v", code, v)
	}
	if ra, err := strconv.Atoi(hdr.Get("Retry-After")); err != nil || ra < 1 {
		t.Fatalf("Retry-After %q", hdr.Get("Retry-After"))
	}
	if e.snapshot() != before {
		t.Fatal("a refused post stored events")
	}
	other := e.mustMintAgent("t1", "r1", "a2")
	if _, err := e.postAs(other, steps(10)); err != nil {
		t.Fatalf("another agent while a1 is limited: %v", err)
	}
	if got := e.metric("agentstream_ingest_rate_limited_total"); got != 1 {
		t.Fatalf("rate_limited_total %v, want 1", got)
	}

	var waits []time.Duration
	ic := &IngestClient{URL: e.base, Token: e.agent, Rig: "r1", HTTP: e.client, RetryFor: time.Minute,
		OnRetry: func(err error, wait time.Duration) {
			waits = append(waits, wait)
			clock.Add(int64(wait)) // the client sleeps that long before it retries
		}}
	batch := make([]container.Line, 500)
	for i := range batch {
		batch[i] = container.Line{Type: "step", Data: []byte(`{}`)}
	}
	if err := ic.Send(context.Background(), batch); err != nil {
		t.Fatalf("IngestClient past the rate: %v", err)
	}
	if len(waits) == 0 || waits[0] < time.Second {
		t.Fatalf("IngestClient waited %v; Retry-After said at least 1s", waits)
	}
}

// TestTicketLimits: a ticket request's agent id obeys ingest's id rules,
// and a town holds a bounded number of unredeemed tickets.
func TestTicketLimits(t *testing.T) {
	e := newEnvWith(t, Options{Limits: Limits{TicketsPerTown: 3}}, model.Options{})
	before := e.tickets(t)
	for _, agent := range []string{strings.Repeat("a", 129), strings.Repeat("b", 900<<10), "has%20space", "tab%09"} {
		code, _, v := e.do("POST", "/api/towns/t1/container/agents/"+agent+"/stream-ticket", e.viewer, "", nil)
		if code != 400 || errCode(v) != "invalid_agent_id" {
			t.Fatalf("ticket for agent %.20q: %d %v, want 400 invalid_agent_id", agent, code, v)
		}
	}
	if got := e.tickets(t); got != before {
		t.Fatalf("bad ticket requests stored %d tickets", got-before)
	}
	var paths []string
	for range 3 {
		paths = append(paths, e.ticket("a1"))
	}
	code, hdr, v := e.do("POST", "/api/towns/t1/container/agents/a1/stream-ticket", e.viewer, "", nil)
	if code != 429 || errCode(v) != "too_many_tickets" || hdr.Get("Retry-After") == "" {
		t.Fatalf("fourth unredeemed ticket: %d %v", code, v)
	}
	// Another town has its own allowance.
	t2, _ := e.auth.MintViewer("t2", time.Hour)
	if code, _, v := e.do("POST", "/api/towns/t2/container/agents/a1/stream-ticket", t2, "", nil); code != 201 {
		t.Fatalf("another town's ticket: %d %v", code, v)
	}
	// Redeeming one makes room.
	c, code := e.openPath("sse-h1", paths[0], 0, nil)
	if c == nil {
		t.Fatalf("redeem: %d", code)
	}
	c.Close()
	e.ticket("a1")
}

func (e *testEnv) tickets(t *testing.T) int {
	t.Helper()
	n, err := e.store.DB().NewSelect().Model((*model.StreamTicket)(nil)).Count(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return int(n)
}
