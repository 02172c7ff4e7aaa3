package server

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"go.uber.org/goleak"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"

	"github.com/agentstream/agentstream/model"
)

// get sends a GET with headers and returns the status and JSON error code.
func (e *testEnv) get(path string, hdr map[string]string) (int, string) {
	e.t.Helper()
	req, _ := http.NewRequest("GET", e.base+path, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	var v map[string]any
	jsonDecode(resp.Body, &v)
	return resp.StatusCode, errCode(v)
}

// metric returns the value of one series of /metrics, 0 if absent.
func (e *testEnv) metric(series string) float64 {
	e.t.Helper()
	v, _ := e.metricOK(series)
	return v
}

// hasMetric reports whether /metrics has the series.
func (e *testEnv) hasMetric(series string) bool {
	e.t.Helper()
	_, ok := e.metricOK(series)
	return ok
}

func (e *testEnv) metricOK(series string) (float64, bool) {
	e.t.Helper()
	resp, err := e.client.Get(e.base + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f, true
		}
	}
	return 0, false
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestStreamRefusals(t *testing.T) {
	e := newEnvWith(t, Options{Origins: []string{"https://dash.example"}}, model.Options{})
	e.mustPost(e.agent, steps(3))
	const stream = "/api/towns/t1/container/agents/a1/stream"
	expired, err := e.store.CreateTicket(context.Background(), "t1", "a1", -time.Second, 0)
	if err != nil {
		t.Fatal(err)
	}
	used := e.ticket("a1")
	if c, code := e.openPath("sse-h1", used, 0, nil); c == nil {
		t.Fatalf("first use of a ticket: %d", code)
	} else {
		c.Close()
	}
	otherTown, _ := e.auth.MintViewer("t2", time.Hour)
	valid := e.ticket("a1") // offered to the wrong town and agent, then used right
	ticketOf := func(path string) string { _, t, _ := strings.Cut(path, "ticket="); return t }

	cases := []struct {
		name, path string
		hdr        map[string]string
		status     int
		code       string
	}{
		{"reused ticket", used, nil, 401, "invalid_ticket"},
		{"expired ticket", stream + "?ticket=" + expired.ID, nil, 401, "invalid_ticket"},
		{"forged ticket", stream + "?ticket=00112233445566778899aabbccddeeff", nil, 401, "invalid_ticket"},
		{"ticket on another town", "/api/towns/t2/container/agents/a1/stream?ticket=" + ticketOf(valid), nil, 401, "invalid_ticket"},
		{"ticket on another agent", "/api/towns/t1/container/agents/a2/stream?ticket=" + ticketOf(valid), nil, 401, "invalid_ticket"},
		{"no credentials", stream, nil, 401, "missing_token"},
		{"agent token", stream, map[string]string{"Authorization": "Bearer " + e.agent}, 403, "wrong_scope"},
		{"viewer of another town", stream, map[string]string{"Authorization": "Bearer " + otherTown}, 403, "wrong_town"},
		{"Last-Event-ID abc", stream, map[string]string{"Authorization": "Bearer " + e.viewer, "Last-Event-ID": "abc"}, 400, "invalid_cursor"},
		{"Last-Event-ID -1", stream, map[string]string{"Authorization": "Bearer " + e.viewer, "Last-Event-ID": "-1"}, 400, "invalid_cursor"},
		{"Last-Event-ID huge", stream, map[string]string{"Authorization": "Bearer " + e.viewer, "Last-Event-ID": "99999999999999999999999"}, 400, "invalid_cursor"},
		{"after not a number", stream + "?after=x", map[string]string{"Authorization": "Bearer " + e.viewer}, 400, "invalid_cursor"},
		{"cross-origin websocket", stream, map[string]string{"Authorization": "Bearer " + e.viewer, "Origin": "https://evil.example",
			"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}, 403, "origin_not_allowed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.snapshot()
			if status, code := e.get(tc.path, tc.hdr); status != tc.status || code != tc.code {
				t.Fatalf("got %d %q, want %d %q", status, code, tc.status, tc.code)
			}
			if e.snapshot() != before {
				t.Fatal("the store changed")
			}
		})
	}
	// The ticket offered to the wrong town and agent was not used up.
	c, code := e.openPath("sse-h1", valid, 0, nil)
	if c == nil {
		t.Fatalf("ticket refused after wrong-path attempts: %d", code)
	}
	c.Close()
	// Origins that are allowed: the server's own host, and --origin.
	for _, origin := range []string{e.base, "https://dash.example"} {
		c, code := e.openPath("ws", e.ticket("a1"), 0, http.Header{"Origin": {origin}})
		if c == nil {
			t.Fatalf("websocket from %s refused: %d", origin, code)
		}
		if got := readN(t, c, 3); len(got) != 3 {
			t.Fatal(got)
		}
		c.Close()
	}
}

// TestTicketRedeemedOnce: of many concurrent redeems of one ticket, exactly
// one wins.
func TestTicketRedeemedOnce(t *testing.T) {
	e := newEnv(t)
	tk, err := e.store.CreateTicket(context.Background(), "t1", "a1", time.Minute, 0)
	if err != nil {
		t.Fatal(err)
	}
	var wins sync.WaitGroup
	var mu sync.Mutex
	n := 0
	for range 16 {
		wins.Go(func() {
			ok, err := e.store.RedeemTicket(context.Background(), tk.ID, "t1", "a1")
			if err != nil {
				t.Error(err)
			}
			if ok {
				mu.Lock()
				n++
				mu.Unlock()
			}
		})
	}
	wins.Wait()
	if n != 1 {
		t.Fatalf("%d of 16 concurrent redeems won, want exactly 1", n)
	}
}

// rawWS opens a WebSocket with a viewer token, bypassing any client library
// politeness, so the test can send what it likes. Reads go through the
// returned reader: it starts with what the dialer buffered.
func (e *testEnv) rawWS() (net.Conn, io.Reader) {
	e.t.Helper()
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Authorization": {"Bearer " + e.viewer}})}
	conn, br, _, err := d.Dial(context.Background(), "ws"+strings.TrimPrefix(e.base, "http")+"/api/towns/t1/container/agents/a1/stream")
	if err != nil {
		e.t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	if br != nil {
		return conn, io.MultiReader(br, conn)
	}
	return conn, conn
}

// readCloseCode reads frames until the server's close frame and returns its
// code, without answering anything.
func readCloseCode(t *testing.T, r io.Reader) ws.StatusCode {
	t.Helper()
	for {
		f, err := ws.ReadFrame(r)
		if err != nil {
			t.Fatalf("reading until close: %v", err)
		}
		if f.Header.OpCode == ws.OpClose {
			code, _ := ws.ParseCloseFrameData(f.Payload)
			return code
		}
	}
}

// TestWSBadFrames: garbage frames close with 1002 (protocol error), a 10 MiB frame with
// 1009, and the server goes on serving.
func TestWSBadFrames(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(2))
	frames := map[string]func(net.Conn){
		"unmasked frame": func(c net.Conn) {
			ws.WriteFrame(c, ws.NewTextFrame([]byte("hello")))
		},
		"reserved opcode": func(c net.Conn) {
			ws.WriteHeader(c, ws.Header{Fin: true, OpCode: 0x3, Masked: true, Length: 0})
		},
		"reserved bits": func(c net.Conn) {
			ws.WriteFrame(c, ws.MaskFrame(ws.Frame{Header: ws.Header{Fin: true, Rsv: 0x4, OpCode: ws.OpText, Length: 2}, Payload: []byte("hi")}))
		},
		"random bytes": func(c net.Conn) {
			c.Write([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
		},
	}
	for name, send := range frames {
		t.Run(name, func(t *testing.T) {
			c, r := e.rawWS()
			defer c.Close()
			send(c)
			if code := readCloseCode(t, r); code != ws.StatusProtocolError {
				t.Fatalf("close %d, want 1002", code)
			}
		})
	}
	t.Run("10 MiB frame", func(t *testing.T) {
		c, r := e.rawWS()
		defer c.Close()
		mask := ws.NewMask()
		ws.WriteHeader(c, ws.Header{Fin: true, OpCode: ws.OpText, Masked: true, Mask: mask, Length: 10 << 20})
		go c.Write(make([]byte, 64<<10)) // the start of the payload; the server stops reading
		if code := readCloseCode(t, r); code != ws.StatusMessageTooBig {
			t.Fatalf("close %d, want 1009", code)
		}
	})
	// Unharmed: a normal stream still works.
	c, code := e.open("ws", "a1", 0)
	if c == nil {
		t.Fatalf("open after bad frames: %d", code)
	}
	defer c.Close()
	if got := readN(t, c, 2); len(got) != 2 {
		t.Fatal(got)
	}
}

// TestNonReadingClientDropped: a client that connects and never reads is
// dropped after the write timeout; its stream's goroutines end.
func TestNonReadingClientDropped(t *testing.T) {
	for _, kind := range []string{"sse", "ws"} {
		t.Run(kind, func(t *testing.T) {
			e := newEnvWith(t, Options{WriteTimeout: 300 * time.Millisecond}, model.Options{Retain: -1})
			before := e.metric(`agentstream_stream_ends_total{reason="write timeout"}`)
			var conn net.Conn
			if kind == "ws" {
				conn, _ = e.rawWS()
			} else {
				var err error
				conn, err = net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(conn, "GET /api/towns/t1/container/agents/a1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", e.viewer)
			}
			defer conn.Close()
			waitUntil(t, "the stream to open", func() bool {
				return e.metric(`agentstream_streams_open{proto="HTTP/1.1",transport="`+kind+`"}`) == 1
			})
			big := `{"type":"tool.output","data":"` + strings.Repeat("x", 60<<10) + `"}`
			body := `{"events":[` + strings.TrimSuffix(strings.Repeat(big+",", 15), ",") + `]}`
			// Post until the stream is dropped: loopback socket buffers hold
			// a few MiB, then writes block and the deadline fires.
			for i := 0; e.metric(`agentstream_stream_ends_total{reason="write timeout"}`) == before; i++ {
				if i == 400 {
					t.Fatal("never dropped after 350 MiB unread")
				}
				e.mustPost(e.agent, body)
			}
			waitUntil(t, "the stream to close", func() bool {
				return e.metric(`agentstream_streams_open{proto="HTTP/1.1",transport="`+kind+`"}`) == 0
			})
		})
	}
}

// TestVanishingClients: 500 clients connect and vanish mid-stream; no
// goroutine is left behind.
func TestVanishingClients(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(10))
	ignore := goleak.IgnoreCurrent()
	var wg sync.WaitGroup
	for i := range 500 {
		wg.Go(func() {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if i%2 == 0 {
				d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Authorization": {"Bearer " + e.viewer}})}
				conn, br, _, err := d.Dial(ctx, "ws"+strings.TrimPrefix(e.base, "http")+"/api/towns/t1/container/agents/a1/stream")
				if err != nil {
					t.Error(err)
					return
				}
				conn.SetDeadline(time.Now().Add(20 * time.Second))
				r := io.Reader(conn)
				if br != nil {
					r = io.MultiReader(br, conn)
				}
				ws.ReadFrame(r) // one event, then vanish
				conn.Close()
				return
			}
			conn, err := net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
			if err != nil {
				t.Error(err)
				return
			}
			fmt.Fprintf(conn, "GET /api/towns/t1/container/agents/a1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", e.viewer)
			buf := make([]byte, 512)
			io.ReadAtLeast(conn, buf, 100) // headers and a little of the stream
			conn.Close()
		})
	}
	wg.Wait()
	e.mustPost(e.agent, steps(5)) // writes to vanished clients fail fast
	waitUntil(t, "every stream to end", func() bool {
		return e.metric(`agentstream_streams_open{proto="HTTP/1.1",transport="sse"}`) == 0 &&
			e.metric(`agentstream_streams_open{proto="HTTP/1.1",transport="ws"}`) == 0
	})
	e.client.Transport.(*http.Transport).CloseIdleConnections()
	// Streams end a moment after their client; Find itself retries for
	// about two seconds, which a loaded machine may need a few times over.
	// The database pool grew for the streams' reads, and a PostgreSQL
	// connection it keeps may keep pgx's reader goroutine: the pool's, not
	// a stream's.
	opts := []goleak.Option{ignore, goleak.IgnoreAnyFunction("github.com/jackc/pgx/v5/pgconn/internal/bgreader.(*BGReader).bgRead")}
	err := goleak.Find(opts...)
	for deadline := time.Now().Add(20 * time.Second); err != nil && time.Now().Before(deadline); {
		err = goleak.Find(opts...)
	}
	if err != nil {
		t.Fatal(err)
	}
	if e.sched.ActiveFeeds() != 0 {
		t.Fatalf("%d feeds still active", e.sched.ActiveFeeds())
	}
}

// TestDrainEndsStreams: on shutdown SSE responses end and WebSockets close
// with 1001 (going away).
func TestDrainEndsStreams(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(1))
	sse, _ := e.open("sse-h1", "a1", 0)
	defer sse.Close()
	wsc, _ := e.open("ws", "a1", 0)
	defer wsc.Close()
	readN(t, sse, 1)
	readN(t, wsc, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.api.Drain(ctx); err != nil {
		t.Fatalf("drain: %v", err)
	}
	if _, err := sse.Next(); err != io.EOF {
		t.Fatalf("SSE after drain: %v, want the response to end", err)
	}
	if code, err := wsc.(*wsClient).closeCode(); err != nil || code != ws.StatusGoingAway {
		t.Fatalf("WS after drain: close %d, %v; want 1001", code, err)
	}
	if status, code := e.get("/api/towns/t1/container/agents/a1/stream", map[string]string{"Authorization": "Bearer " + e.viewer}); status != 503 || code != "shutting_down" {
		t.Fatalf("new stream while draining: %d %s", status, code)
	}
}

// TestKeepalive: a quiet stream gets keepalives — an SSE comment, a
// WebSocket ping — so proxies and clients see it alive.
func TestKeepalive(t *testing.T) {
	e := newEnvWith(t, Options{Keepalive: 50 * time.Millisecond}, model.Options{})
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET /api/towns/t1/container/agents/a1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", e.viewer)
	sc := bufio.NewScanner(conn)
	for found := false; !found; {
		if !sc.Scan() {
			t.Fatalf("SSE stream ended without a keepalive: %v", sc.Err())
		}
		found = strings.HasSuffix(sc.Text(), ": keepalive")
	}
	wsConn, r := e.rawWS()
	defer wsConn.Close()
	for {
		f, err := ws.ReadFrame(r)
		if err != nil {
			t.Fatalf("WebSocket ended without a ping: %v", err)
		}
		if f.Header.OpCode == ws.OpPing {
			break
		}
	}
}

// rawSSE opens an SSE stream of a1 on a bare HTTP/1.1 connection and
// returns the connection and a line reader on it.
func (e *testEnv) rawSSE() (net.Conn, *bufio.Reader) {
	e.t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		e.t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(conn, "GET /api/towns/t1/container/agents/a1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", e.viewer)
	return conn, bufio.NewReader(conn)
}

// readSSEID reads an SSE stream up to the next event and returns its id.
func readSSEID(t *testing.T, r *bufio.Reader) int64 {
	t.Helper()
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading SSE: %v", err)
		}
		if v, ok := strings.CutPrefix(line, "id: "); ok {
			id, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return id
		}
	}
}

// readWSID reads WebSocket frames up to the next event and returns its id.
func readWSID(t *testing.T, r io.Reader) int64 {
	t.Helper()
	for {
		f, err := ws.ReadFrame(r)
		if err != nil {
			t.Fatalf("reading WebSocket: %v", err)
		}
		if f.Header.OpCode == ws.OpText {
			var m msg
			if err := json.Unmarshal(f.Payload, &m); err != nil {
				t.Fatal(err)
			}
			return m.ID
		}
	}
}

// TestIdleStreamsHoldNoGoroutines: with the Poller, a stream between
// events holds no goroutine — not one to wait for events, not one to read
// its client — which is most of what an idle stream would cost. The
// streams still deliver the next event, and a client that leaves is still
// noticed without anything being written to it.
func TestIdleStreamsHoldNoGoroutines(t *testing.T) {
	e := newEnv(t)
	if e.api.streamOpts.Poller == nil {
		t.Skip("no Poller on this system: streams read their clients on a goroutine each")
	}
	first := e.mustPost(e.agent, steps(1))[0]
	waitUntil(t, "a stable goroutine count", func() bool { return true })
	base := runtime.NumGoroutine()

	const n = 50 // of each transport
	var wsConns []net.Conn
	var wsReaders []io.Reader
	var sseConns []net.Conn
	var sseReaders []*bufio.Reader
	for range n {
		c, r := e.rawWS()
		wsConns, wsReaders = append(wsConns, c), append(wsReaders, r)
		if id := readWSID(t, r); id != first {
			t.Fatalf("ws backfill: id %d, want %d", id, first)
		}
		c2, r2 := e.rawSSE()
		sseConns, sseReaders = append(sseConns, c2), append(sseReaders, r2)
		if id := readSSEID(t, r2); id != first {
			t.Fatalf("sse backfill: id %d, want %d", id, first)
		}
	}
	// Without the Poller this would be 2n goroutines or more.
	waitUntil(t, fmt.Sprintf("%d idle streams to hold no goroutines", 2*n), func() bool {
		return runtime.NumGoroutine() <= base+5
	})

	next := e.mustPost(e.agent, steps(1))[0]
	for i := range n {
		if id := readWSID(t, wsReaders[i]); id != next {
			t.Fatalf("ws live: id %d, want %d", id, next)
		}
		if id := readSSEID(t, sseReaders[i]); id != next {
			t.Fatalf("sse live: id %d, want %d", id, next)
		}
	}
	for i := range n {
		wsConns[i].Close()
		sseConns[i].Close()
	}
	waitUntil(t, "every stream to notice its client left", func() bool {
		return e.metric(`agentstream_streams_open{proto="HTTP/1.1",transport="sse"}`) == 0 &&
			e.metric(`agentstream_streams_open{proto="HTTP/1.1",transport="ws"}`) == 0
	})
	if got := e.metric(`agentstream_stream_ends_total{reason="client gone"}`); got != 2*n {
		t.Fatalf("%v streams ended as client gone, want %d", got, 2*n)
	}
}

// TestSilentWSClientDropped: a WebSocket client that answers no ping is
// dropped after three keepalive intervals; one that answers stays.
func TestSilentWSClientDropped(t *testing.T) {
	for _, poller := range []bool{true, false} {
		t.Run(fmt.Sprintf("poller=%v", poller), func(t *testing.T) {
			opts := Options{Keepalive: 100 * time.Millisecond}
			var e *testEnv
			if poller {
				e = newEnvWith(t, opts, model.Options{})
			} else {
				e = newEnvNoPoller(t, opts, model.Options{})
			}
			silent, sr := e.rawWS()
			defer silent.Close()
			polite, pr := e.rawWS()
			defer polite.Close()
			go func() {
				for {
					f, err := ws.ReadFrame(pr)
					if err != nil {
						return
					}
					if f.Header.OpCode == ws.OpPing {
						ws.WriteFrame(polite, ws.MaskFrame(ws.NewPongFrame(f.Payload)))
					}
				}
			}()
			for {
				if _, err := ws.ReadFrame(sr); err != nil {
					break // dropped: the socket closed under the reader
				}
			}
			waitUntil(t, "the silent client's stream to end", func() bool {
				return e.metric(`agentstream_stream_ends_total{reason="client silent"}`) == 1
			})
			if got := e.metric(`agentstream_streams_open{proto="HTTP/1.1",transport="ws"}`); got != 1 {
				t.Fatalf("%v WebSocket streams open, want the polite one", got)
			}
		})
	}
}
