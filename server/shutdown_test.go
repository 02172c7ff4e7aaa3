package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDrainStopsTakingWork: once the server begins to drain, /readyz,
// new posts and new streams answer 503 shutting_down at once.
func TestDrainStopsTakingWork(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(1))
	e.api.BeginDrain()
	if code, _, v := e.do("GET", "/readyz", "", "", nil); code != 503 || errCode(v) != "shutting_down" {
		t.Fatalf("readyz while draining: %d %v", code, v)
	}
	before := e.snapshot()
	code, hdr, v := e.do("POST", "/api/rigs/r1/agent-events", e.agent, "application/json", []byte(steps(1)))
	if code != 503 || errCode(v) != "shutting_down" || hdr.Get("Retry-After") == "" {
		t.Fatalf("post while draining: %d %v", code, v)
	}
	if e.snapshot() != before {
		t.Fatal("a post was stored while draining")
	}
	if status, code := e.get("/api/towns/t1/container/agents/a1/stream", map[string]string{"Authorization": "Bearer " + e.viewer}); status != 503 || code != "shutting_down" {
		t.Fatalf("stream while draining: %d %q", status, code)
	}
}

// TestServeStopsAtOnce: on SIGTERM (the end of Serve's context) the
// listener closes at once, so new connections are refused while a stream
// that never reads is still draining; the process's Serve returns within
// the drain timeout, long before that stream's write timeout.
func TestServeStopsAtOnce(t *testing.T) {
	secret := strings.Repeat("s", 32)
	auth, _ := NewAuth([]byte(secret))
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	addrc := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, Config{Addr: "127.0.0.1:0", DataDir: t.TempDir(), Secret: secret,
			WriteTimeout: 5 * time.Minute, DrainTimeout: 3 * time.Second,
			Ready: func(a net.Addr) { addrc <- a }, Log: slog.New(slog.DiscardHandler)})
	}()
	var addr string
	select {
	case a := <-addrc:
		addr = a.String()
	case err := <-done:
		t.Fatalf("serve: %v", err)
	}
	base := "http://" + addr
	agent, _ := auth.MintAgent("t1", "r1", "a1", time.Hour)
	viewer, _ := auth.MintViewer("t1", time.Hour)
	pad := strings.Repeat("x", 60<<10)
	for range 10 { // 6 MiB: far more than the connection's buffers hold with a 4 KiB receive buffer
		body := `{"events":[` + strings.Repeat(fmt.Sprintf(`{"type":"big","data":%q},`, pad), 9) + fmt.Sprintf(`{"type":"big","data":%q}]}`, pad)
		req, _ := http.NewRequest("POST", base+"/api/rigs/r1/agent-events", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+agent)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != 201 {
			t.Fatalf("post: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	// A stream that never reads, on a small receive buffer: its writes
	// block for the write timeout.
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /api/towns/t1/container/agents/a1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", viewer)
	// Until the server has written to the stream and the writes have
	// stopped: the stream is blocked in a write to its full socket.
	written, still := -1.0, 0
	waitUntil(t, "the stream's writes to block", func() bool {
		n := metricAt(t, base, "agentstream_stream_events_written_total{transport=\"sse\"}")
		if n > 0 && n == written {
			still++
		} else {
			still = 0
		}
		written = n
		time.Sleep(50 * time.Millisecond)
		return still >= 10
	})

	stop() // SIGTERM
	waitUntil(t, "new connections to be refused", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return false
		}
		// A connection caught in the backlog as the listener closed is
		// reset; the next one is refused.
		if errors.Is(err, syscall.ECONNRESET) {
			return false
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial: %v", err)
		}
		return true
	})
	select {
	case err := <-done:
		t.Fatalf("serve returned (%v) before the refusal could be seen during the drain", err)
	default:
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("serve did not return within its drain timeout (3 s), waiting instead on the stream's write timeout")
	}
}

// metricAt reads one series of a server's /metrics, 0 if absent.
func metricAt(t *testing.T, base, series string) float64 {
	t.Helper()
	e := &testEnv{t: t, base: base, client: http.DefaultClient}
	return e.metric(series)
}
