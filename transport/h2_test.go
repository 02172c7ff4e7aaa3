package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
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
	pool    *x509.CertPool // with TLS: trusts the server's certificate
	ln      net.Listener   // what the http.Server serves
}

func newH2Env(t *testing.T, writeTimeout time.Duration) *h2Env {
	return newH2EnvTLS(t, writeTimeout, false)
}

// newH2EnvTLS is newH2Env, over TLS (terminated by H2.TLSListener) when
// withTLS is set.
func newH2EnvTLS(t *testing.T, writeTimeout time.Duration, withTLS bool) *h2Env {
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
	mux.HandleFunc("GET /whoami", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s tls=%t", r.Proto, r.TLS != nil)
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
	e.ln = NewLimitListener(ln, 1000, nil)
	if withTLS {
		cert, pool := testCert(t)
		e.pool = pool
		e.ln = e.h2.TLSListener(e.ln, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}, 2*time.Second)
	}
	go srv.Serve(e.ln)
	t.Cleanup(func() {
		srv.Close()
		e.h2.Close()
	})
	return e
}

// client is Go's own HTTP/2 client, cleartext with prior knowledge (or
// over TLS): one connection for every request.
func (e *h2Env) client() *http.Client {
	p := new(http.Protocols)
	if e.pool != nil {
		p.SetHTTP2(true)
	} else {
		p.SetUnencryptedHTTP2(true)
	}
	tr := &http.Transport{Protocols: p, TLSClientConfig: &tls.Config{RootCAs: e.pool}}
	e.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr} // no Timeout: it would cut streams
}

func (e *h2Env) url(path string) string {
	if e.pool != nil {
		return "https://" + e.addr + path
	}
	return "http://" + e.addr + path
}

// bodiesPastWindows downloads /big and uploads n bodies at once to /echo,
// each past both flow-control windows, and checks what came back.
func (e *h2Env) bodiesPastWindows(c *http.Client, n int) {
	t := e.t
	t.Helper()
	resp, err := c.Get(e.url("/big"))
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.ProtoMajor != 2 || len(body) != 100000 || !strings.HasSuffix(string(body), fmt.Sprintf("%099d\n", 999)) {
		t.Fatalf("GET /big: %v, %s, %d bytes", err, resp.Proto, len(body))
	}
	var wg sync.WaitGroup
	for i := range n {
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
}

// testCert makes a certificate for 127.0.0.1, and a pool that trusts it.
func testCert(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, pool
}

// TestH2Requests: ordinary requests over agentstream's HTTP/2 server, as a
// browser makes them beside its streams: bodies past the flow-control
// windows both ways, concurrent streams on one connection, HEAD, 204, a
// handler that aborts, and a body read under a deadline.
func TestH2Requests(t *testing.T) {
	e := newH2Env(t, 5*time.Second)
	c := e.client()

	// Uploads past both receive windows, eight at once on the connection.
	e.bodiesPastWindows(c, 8)

	resp, err := c.Head(e.url("/big"))
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
// readers, TLS handshakes, handlers, and writers waiting for a window.
func serverGoroutines() int {
	var b bytes.Buffer
	pprof.Lookup("goroutine").WriteTo(&b, 2)
	n := 0
	for _, g := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(g, "transport.(*h2Conn)") || strings.Contains(g, "transport.(*H2SSE)") ||
			strings.Contains(g, "transport.(*tlsListener).handshake") {
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

// TestH2HeaderTable: the server keeps no HPACK dynamic table. A client
// may index fields before it has the server's SETTINGS, and requests after
// it acknowledges them still decode; a client that acknowledges and then
// refers to its old entries anyway is a COMPRESSION_ERROR.
func TestH2HeaderTable(t *testing.T) {
	e := newH2Env(t, time.Second)
	statusOf := func(c *rawH2, id uint32) string {
		h := c.next(func(f http2.Frame) bool {
			h, ok := f.(*http2.MetaHeadersFrame)
			return ok && h.StreamID == id
		}).(*http2.MetaHeadersFrame)
		return h.PseudoValue("status")
	}
	serverSettings := func(c *rawH2) *http2.SettingsFrame {
		return c.next(func(f http2.Frame) bool { s, ok := f.(*http2.SettingsFrame); return ok && !s.IsAck() }).(*http2.SettingsFrame)
	}

	c := dialRawH2(t, e.addr)
	c.get(1, "/empty") // indexed in the client's table, before any ACK
	s := serverSettings(c)
	if v, ok := s.Value(http2.SettingHeaderTableSize); !ok || v != 0 {
		t.Fatalf("SETTINGS_HEADER_TABLE_SIZE = %d (sent: %v), want 0", v, ok)
	}
	if got := statusOf(c, 1); got != "204" {
		t.Fatalf("first request: status %q", got)
	}
	c.enc.SetMaxDynamicTableSizeLimit(0)
	c.fr.WriteSettingsAck()
	for _, id := range []uint32{3, 5} {
		c.get(id, "/empty")
		if got := statusOf(c, id); got != "204" {
			t.Fatalf("request %d after the ACK: status %q", id, got)
		}
	}

	bad := dialRawH2(t, e.addr)
	bad.get(1, "/empty")
	serverSettings(bad)
	statusOf(bad, 1)
	bad.fr.WriteSettingsAck()
	bad.get(3, "/empty") // its encoder still refers to its table
	g := bad.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
	if g.ErrCode != http2.ErrCodeCompression {
		t.Fatalf("GOAWAY %v, want %v", g.ErrCode, http2.ErrCodeCompression)
	}
	bad.waitClosed("GOAWAY")
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

// TestH2OverTLS: with TLS terminated by H2.TLSListener, HTTP/2 and
// HTTP/1.1 clients share the port; bodies past the windows cross TLS
// records read without waiting; idle streams hold no goroutine, handshake
// included; a client that never finishes its handshake holds up no one,
// and one that speaks no TLS is closed.
func TestH2OverTLS(t *testing.T) {
	e := newH2EnvTLS(t, 5*time.Second, true)
	c := e.client()
	whoami := func(c *http.Client, want string) {
		t.Helper()
		resp, err := c.Get(e.url("/whoami"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != want {
			t.Fatalf("GET /whoami: %q, want %q", b, want)
		}
	}

	// A client that connects and says nothing holds a handshake goroutine
	// until its timeout; others are served meanwhile.
	quiet, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	whoami(c, "HTTP/2.0 tls=true")
	p1 := new(http.Protocols)
	p1.SetHTTP1(true)
	h1 := &http.Transport{Protocols: p1, TLSClientConfig: &tls.Config{RootCAs: e.pool}}
	defer h1.CloseIdleConnections()
	whoami(&http.Client{Transport: h1}, "HTTP/1.1 tls=true")

	// Uploads and a download past the flow-control windows.
	e.bodiesPastWindows(c, 4)

	// Streams, a connection each, idle without a goroutine.
	const n = 10
	var bodies []*bufio.Reader
	var cancels []context.CancelFunc
	for i := range n {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "GET", e.url(fmt.Sprintf("/sse?i=%d", i)), nil)
		resp, err := e.client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		bodies = append(bodies, bufio.NewReader(resp.Body))
		cancels = append(cancels, cancel)
	}
	var streams []*H2SSE
	for range n {
		streams = append(streams, <-e.streams)
	}
	// The quiet client is dropped at the handshake timeout.
	quiet.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := quiet.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("a client silent past the handshake timeout: %v, want EOF", err)
	}
	waitFor(t, "idle TLS streams to hold no server goroutine", func() bool {
		return serverGoroutines() == 0
	})
	for i, st := range streams {
		if err := st.WriteEvents([][]byte{Encode(FormatSSE, int64(i), []byte(`{"a":1}`))}); err != nil {
			t.Fatal(err)
		}
	}
	for i, r := range bodies {
		want := fmt.Sprintf("retry: 2000\n\nid: %d\ndata: {\"a\":1}\n\n", i)
		got := make([]byte, len(want))
		if _, err := io.ReadFull(r, got); err != nil || string(got) != want {
			t.Fatalf("stream %d read %q, %v", i, got, err)
		}
	}
	cancels[0]()
	if p := <-e.gone; p != "/sse?i=0" {
		t.Fatalf("gone: %s, want /sse?i=0", p)
	}

	// Plain HTTP on the TLS port: the handshake fails, the connection
	// closes.
	plain, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	io.WriteString(plain, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	plain.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, plain); err != nil {
		t.Fatalf("plain HTTP on the TLS port: %v, want the connection closed", err)
	}

	// Closed, the listener accepts no more.
	e.ln.Close()
	if _, err := e.ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}
