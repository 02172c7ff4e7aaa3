package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Env is an http.Server on 127.0.0.1 with H2 installed, as agentstream
// serves: connections through a LimitListener, idle ones read through a
// Poller. Its /sse handler detaches an SSE stream and hands it to the test.
type h2Env struct {
	t       *testing.T
	addr    string
	streams chan *H2SSE
	gone    chan string // the path of a detached stream whose client left
	h2      *H2
}

func newH2Env(t *testing.T, writeTimeout time.Duration) *h2Env {
	t.Helper()
	poller, err := NewPoller()
	if err != nil {
		t.Skipf("no Poller on this system: %v", err)
	}
	t.Cleanup(func() { poller.Close() })
	e := &h2Env{t: t, streams: make(chan *H2SSE, 100), gone: make(chan string, 100)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /sse", func(w http.ResponseWriter, r *http.Request) {
		path := r.URL.String()
		st, err := DetachSSE(w, r, e.h2.Opts, false, func() { e.gone <- path })
		if err != nil {
			t.Errorf("DetachSSE: %v", err)
			return
		}
		e.streams <- st
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	})
	mux.HandleFunc("GET /big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		for i := range 1000 {
			fmt.Fprintf(w, "%099d\n", i) // 100 KB, past the default windows
		}
	})
	mux.HandleFunc("GET /flush", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		http.NewResponseController(w).Flush()
		<-r.Context().Done() // until the client resets the stream
	})
	mux.HandleFunc("GET /empty", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /panic", func(w http.ResponseWriter, r *http.Request) {
		panic(http.ErrAbortHandler)
	})
	mux.HandleFunc("POST /slow", func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		_, err := io.ReadAll(r.Body)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			http.Error(w, "body too slow", http.StatusRequestTimeout)
			return
		}
		io.WriteString(w, "read it all")
	})
	e.h2 = &H2{Handler: mux, Opts: Options{WriteTimeout: writeTimeout, Poller: poller}}
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetHTTP2(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: mux, Protocols: p}
	e.h2.Install(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	go srv.Serve(NewLimitListener(ln, 1000, nil))
	t.Cleanup(func() {
		srv.Close()
		e.h2.Close()
	})
	return e
}

// client is Go's own HTTP/2 client, cleartext with prior knowledge: one
// connection for every request.
func (e *h2Env) client() *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: p}
	e.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr} // no Timeout: it would cut streams
}

func (e *h2Env) url(path string) string { return "http://" + e.addr + path }

// TestH2Requests: ordinary requests over agentstream's HTTP/2 server, as a
// browser makes them beside its streams: bodies past the flow-control
// windows both ways, concurrent streams on one connection, HEAD, 204, a
// handler that aborts, and a body read under a deadline.
func TestH2Requests(t *testing.T) {
	e := newH2Env(t, 5*time.Second)
	c := e.client()

	resp, err := c.Get(e.url("/big"))
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.ProtoMajor != 2 || len(body) != 100000 || !strings.HasSuffix(string(body), fmt.Sprintf("%099d\n", 999)) {
		t.Fatalf("GET /big: %v, %s, %d bytes", err, resp.Proto, len(body))
	}

	// Uploads past both receive windows, eight at once on the connection.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			data := bytes.Repeat([]byte{byte('a' + i)}, 3<<20+i)
			resp, err := c.Post(e.url("/echo"), "application/octet-stream", bytes.NewReader(data))
			if err != nil {
				t.Error(err)
				return
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if want := fmt.Sprintf("%d %x", len(data), sha256.Sum256(data)); string(got) != want {
				t.Errorf("upload %d: %q, want %q", i, got, want)
			}
		})
	}
	wg.Wait()

	resp, err = c.Head(e.url("/big"))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("HEAD: %v %v", resp, err)
	}
	resp, err = c.Get(e.url("/empty"))
	if err != nil || resp.StatusCode != 204 {
		t.Fatalf("GET /empty: %v %v", resp, err)
	}
	if _, err := c.Get(e.url("/panic")); err == nil {
		t.Fatal("a handler that aborts: the request succeeded")
	}
	// The connection outlives the aborted stream.
	resp, err = c.Get(e.url("/empty"))
	if err != nil || resp.StatusCode != 204 {
		t.Fatalf("after the abort: %v %v", resp, err)
	}

	// A body that stops coming fails the handler's read at its deadline.
	pr, pw := io.Pipe()
	defer pw.Close()
	go pw.Write([]byte("a start, and no more"))
	resp, err = c.Post(e.url("/slow"), "text/plain", pr)
	if err != nil || resp.StatusCode != http.StatusRequestTimeout {
		t.Fatalf("POST /slow: %v %v", resp, err)
	}
	resp.Body.Close()
}

// TestH2DetachedStreams: event streams detached from their handlers hold
// no goroutine while idle, on one connection or many, still take writes,
// and hear when their client resets them or closes its connection.
func TestH2DetachedStreams(t *testing.T) {
	e := newH2Env(t, 5*time.Second)

	const n = 20
	var bodies []*bufio.Reader
	var closers []io.Closer
	var cancels []context.CancelFunc
	shared := e.client()
	for i := range 2 * n {
		c := shared
		if i >= n {
			c = e.client() // a connection each
		}
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, "GET", e.url(fmt.Sprintf("/sse?i=%d", i)), nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("Content-Type %q", resp.Header.Get("Content-Type"))
		}
		bodies = append(bodies, bufio.NewReader(resp.Body))
		closers = append(closers, resp.Body)
		cancels = append(cancels, cancel)
	}
	var streams []*H2SSE
	for range 2 * n {
		streams = append(streams, <-e.streams)
	}
	// The client's side (in this process too) keeps goroutines per stream
	// and connection; the server's side keeps none.
	waitFor(t, "idle detached streams to hold no server goroutine", func() bool {
		return serverGoroutines() == 0
	})
	for _, st := range streams {
		frames := [][]byte{Encode(FormatSSE, 1, []byte(`{"a":1}`)), Encode(FormatSSE, 2, []byte(`{"a":2}`))}
		if err := st.WriteEvents(frames); err != nil {
			t.Fatal(err)
		}
	}
	for i, b := range bodies {
		want := "retry: 2000\n\nid: 1\ndata: {\"a\":1}\n\nid: 2\ndata: {\"a\":2}\n\n"
		got := make([]byte, len(want))
		if _, err := io.ReadFull(b, got); err != nil || string(got) != want {
			t.Fatalf("stream %d read %q, %v", i, got, err)
		}
	}
	// A reset stream on the shared connection is heard; its neighbours go on.
	cancels[0]()
	if p := <-e.gone; p != "/sse?i=0" {
		t.Fatalf("gone: %s, want /sse?i=0", p)
	}
	if err := streams[1].Keepalive(); err != nil {
		t.Fatal(err)
	}
	ka := make([]byte, len(": keepalive\n\n"))
	if _, err := io.ReadFull(bodies[1], ka); err != nil || string(ka) != ": keepalive\n\n" {
		t.Fatalf("after a neighbour's reset: %q %v", ka, err)
	}
	// A stream the server ends reads to EOF.
	streams[1].Close(ReasonEnded)
	if rest, err := io.ReadAll(bodies[1]); err != nil || len(rest) != 0 {
		t.Fatalf("after Close: %q %v", rest, err)
	}
	for i := range cancels {
		cancels[i]()
		closers[i].Close()
	}
	for range 2*n - 2 {
		select {
		case <-e.gone:
		case <-time.After(10 * time.Second):
			t.Fatal("not every closed stream was heard of")
		}
	}
}

// serverGoroutines counts the goroutines running H2's code: connection
// readers, handlers, and writers waiting for a window.
func serverGoroutines() int {
	var b bytes.Buffer
	pprof.Lookup("goroutine").WriteTo(&b, 2)
	n := 0
	for _, g := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(g, "transport.(*h2Conn)") || strings.Contains(g, "transport.(*H2SSE)") {
			n++
		}
	}
	return n
}

// waitFor polls cond until it holds, or fails the test after 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rawH2 is a hand-driven HTTP/2 client, for what Go's client will not do.
type rawH2 struct {
	t    *testing.T
	conn net.Conn
	fr   *http2.Framer
	hbuf bytes.Buffer
	enc  *hpack.Encoder
}

func dialRawH2(t *testing.T, addr string, settings ...http2.Setting) *rawH2 {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	c := &rawH2{t: t, conn: conn, fr: http2.NewFramer(conn, conn)}
	c.enc = hpack.NewEncoder(&c.hbuf)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	io.WriteString(conn, http2.ClientPreface)
	if err := c.fr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	return c
}

// get opens stream id with a GET of path.
func (c *rawH2) get(id uint32, path string) {
	c.hbuf.Reset()
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "x"}, {":path", path}} {
		c.enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hbuf.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		c.t.Fatal(err)
	}
}

// next reads frames until one that match accepts, which it returns.
func (c *rawH2) next(match func(http2.Frame) bool) http2.Frame {
	c.t.Helper()
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			c.t.Fatalf("read frame: %v", err)
		}
		if match(f) {
			return f
		}
	}
}

// waitClosed reads until the server closes the connection; frames written
// before the close (a SETTINGS ack, a response under way) may still come.
func (c *rawH2) waitClosed(after string) {
	c.t.Helper()
	for {
		_, err := c.fr.ReadFrame()
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.t.Fatalf("the connection is still open after %s", after)
		}
		return
	}
}

// TestH2FlowControl: a stream's writes stop at the client's window and go
// on when it opens; a client that never opens it has its stream fail at
// the write timeout, and the connection's other streams are unharmed.
func TestH2FlowControl(t *testing.T) {
	e := newH2Env(t, 300*time.Millisecond)
	c := dialRawH2(t, e.addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 20})
	c.get(1, "/sse")
	st := <-e.streams
	// "retry: 2000\n\n" took 13 of the 20 bytes.
	got := func() string {
		f := c.next(func(f http2.Frame) bool { d, ok := f.(*http2.DataFrame); return ok && d.StreamID == 1 }).(*http2.DataFrame)
		return string(f.Data())
	}
	if d := got(); d != "retry: 2000\n\n" {
		t.Fatalf("first DATA %q", d)
	}
	done := make(chan error, 1)
	go func() { done <- st.WriteEvents([][]byte{[]byte("0123456789abcdef")}) }()
	if d := got(); d != "0123456" {
		t.Fatalf("within the window: %q, want the 7 bytes left", d)
	}
	if err := c.fr.WriteWindowUpdate(1, 100); err != nil {
		t.Fatal(err)
	}
	if d := got(); d != "789abcdef" {
		t.Fatalf("after WINDOW_UPDATE: %q", d)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// A second stream the client never lets write.
	c.get(3, "/sse")
	st3 := <-e.streams
	go func() { done <- st3.WriteEvents([][]byte{bytes.Repeat([]byte("x"), 200)}) }()
	if err := <-done; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a write the window never allows: %v, want a deadline error", err)
	}
	if err := st.Keepalive(); err != nil {
		t.Fatalf("the other stream after its neighbour timed out: %v", err)
	}
	if d := got(); d != ": keepalive\n\n" {
		t.Fatalf("%q", d)
	}
}

// TestH2ProtocolErrors: PING is answered; a frame that breaks the protocol
// ends the connection with a GOAWAY naming the error.
func TestH2ProtocolErrors(t *testing.T) {
	e := newH2Env(t, time.Second)
	c := dialRawH2(t, e.addr)
	data := [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	c.fr.WritePing(false, data)
	p := c.next(func(f http2.Frame) bool { _, ok := f.(*http2.PingFrame); return ok }).(*http2.PingFrame)
	if !p.IsAck() || p.Data != data {
		t.Fatalf("PING answer %+v", p)
	}

	cases := []struct {
		name string
		send func(c *rawH2)
		code http2.ErrCode
	}{
		{"even stream id", func(c *rawH2) { c.get(2, "/empty") }, http2.ErrCodeProtocol},
		{"stream id going down", func(c *rawH2) { c.get(5, "/empty"); c.get(3, "/empty") }, http2.ErrCodeProtocol},
		{"frame past the maximum size", func(c *rawH2) {
			c.fr.WriteRawFrame(http2.FrameData, 0, 1, make([]byte, h2MaxFrame+1))
		}, http2.ErrCodeFrameSize},
		{"DATA on an idle stream", func(c *rawH2) { c.fr.WriteData(7, true, []byte("x")) }, http2.ErrCodeProtocol},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRawH2(t, e.addr)
			tc.send(c)
			g := c.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
			if g.ErrCode != tc.code {
				t.Fatalf("GOAWAY %v, want %v", g.ErrCode, tc.code)
			}
			c.waitClosed("GOAWAY")
		})
	}
}

// TestH2Shutdown: Shutdown sends GOAWAY, lets a response under way finish,
// and closes an idle connection.
func TestH2Shutdown(t *testing.T) {
	e := newH2Env(t, time.Second)
	c := dialRawH2(t, e.addr)
	c.get(1, "/flush")
	c.next(func(f http2.Frame) bool { _, ok := f.(*http2.DataFrame); return ok })
	idle := dialRawH2(t, e.addr)
	idle.next(func(f http2.Frame) bool { _, ok := f.(*http2.SettingsFrame); return ok })

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := e.h2.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with a handler still running: %v", err)
	}
	g := c.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
	if g.ErrCode != http2.ErrCodeNo || g.LastStreamID != 1 {
		t.Fatalf("GOAWAY %v last %d", g.ErrCode, g.LastStreamID)
	}
	idle.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok })
	idle.waitClosed("GOAWAY on an idle connection")
	// A new stream after GOAWAY is refused.
	c.get(3, "/empty")
	r := c.next(func(f http2.Frame) bool { _, ok := f.(*http2.RSTStreamFrame); return ok }).(*http2.RSTStreamFrame)
	if r.StreamID != 3 || r.ErrCode != http2.ErrCodeRefusedStream {
		t.Fatalf("RST_STREAM %d %v", r.StreamID, r.ErrCode)
	}
	// Resetting the stream under way lets its handler return, and the
	// connection close.
	c.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if err := e.h2.Shutdown(ctx2); err != nil {
		t.Fatalf("Shutdown after the last handler: %v", err)
	}
	for {
		if _, err := c.fr.ReadFrame(); err != nil {
			break
		}
	}
}
