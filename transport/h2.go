package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// H2 serves HTTP/2 connections itself, in place of net/http's HTTP/2
// server, so that an event stream on HTTP/2 costs what one on HTTP/1.1
// does. net/http keeps three goroutines per connection (its serve loop,
// a frame reader and each handler) and a 4 KiB buffer per response for
// as long as the stream lives: about 50 KiB for an idle stream. Here an
// event stream is detached from its handler (DetachSSE) as a hijacked
// HTTP/1.1 one is, a connection is read through the Poller rather than
// by a goroutine parked in Read, and an idle connection holds no goroutine
// and no write buffer.
//
// Every other request on the connection (the dashboard's files, tickets,
// posts) runs its handler on a goroutine of its own, with a
// ResponseWriter that supports Flush, http.ResponseController's read and
// write deadlines, and request bodies under HTTP/2 flow control. What it
// does not do: server push, request trailers (read and dropped),
// priorities (ignored, as RFC 9113 allows), and the HTTP/1.1 Upgrade to
// h2c (prior knowledge only, as net/http).
//
// Install it with Install on an http.Server (and, over TLS, serve that
// server on TLSListener); Shutdown stops it.
type H2 struct {
	Handler     http.Handler
	Opts        Options       // WriteTimeout bounds every write; Poller reads idle cleartext connections
	IdleTimeout time.Duration // a connection with no stream this long is closed (0: never)
	Log         *slog.Logger

	mu       sync.Mutex
	conns    map[*h2Conn]struct{}
	draining bool
	handlers sync.WaitGroup // handlers running, detached streams not counted
}

// What the server advertises (see the SETTINGS it sends).
const (
	h2MaxStreams    = 250
	h2StreamWindow  = 256 << 10 // request body bytes a stream may send ahead
	h2ConnWindow    = 1 << 20   // and all of a connection's streams together
	h2MaxFrame      = 16 << 10  // the largest frame read (the protocol's minimum maximum)
	h2MaxHeaderList = 1 << 20
	h2MaxHeaderWait = 64 << 10 // bytes of an unfinished header block held while its CONTINUATIONs come
	h2DefaultWindow = 65535
)

// Install makes srv hand every HTTP/2 connection, over TLS by ALPN and in
// cleartext with prior knowledge, to s. srv must have HTTP/2 in its
// Protocols (for the ALPN token); its own HTTP/2 server is then not used.
// Over TLS, serving srv on s.TLSListener is better than srv's ServeTLS:
// net/http keeps a goroutine per connection handed over, which TLSListener
// does not.
func (s *H2) Install(srv *http.Server) {
	if srv.TLSNextProto == nil {
		srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	}
	srv.TLSNextProto["h2"] = func(_ *http.Server, tc *tls.Conn, _ http.Handler) {
		// net/http closes the connection when this returns: the TLS
		// connection is read on this goroutine for its whole life.
		st := tc.ConnectionState()
		s.serve(tc, &st, false, nil)
	}
	srv.TLSNextProto["unencrypted_http2"] = func(_ *http.Server, tc *tls.Conn, _ http.Handler) {
		nc, ok := tc.NetConn().(interface{ UnencryptedNetConn() net.Conn })
		if !ok {
			tc.Close()
			return
		}
		conn := nc.UnencryptedNetConn()
		// The preface has been read. A connection that can be taken from
		// net/http is, and net/http's connection goroutine (with its
		// buffers) ends at once; otherwise this goroutine serves it.
		if d, ok := conn.(interface{ Detach() net.Conn }); ok && s.Opts.Poller != nil && socket(conn) != nil {
			conn = d.Detach()
			s.serve(conn, nil, true, &pollConn{Conn: conn})
			return
		}
		s.serve(conn, nil, true, nil)
	}
}

// Shutdown sends GOAWAY on every connection, so that clients open new
// streams elsewhere, and waits until the handlers of requests in flight
// have returned or ctx ends. Detached streams are not waited for: their
// owner ends them. Connections close as their last stream ends.
func (s *H2) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	conns := make([]*h2Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.goAway(http2.ErrCodeNo)
	}
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes every connection at once.
func (s *H2) Close() {
	s.mu.Lock()
	conns := make([]*h2Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close(net.ErrClosed)
	}
}

func (s *H2) logf(msg string, args ...any) {
	if s.Log != nil {
		s.Log.Debug(msg, args...)
	}
}

// h2Conn is one HTTP/2 connection.
type h2Conn struct {
	s    *H2
	conn net.Conn
	out  net.Conn // where writes go (writerOf)
	tls  *tls.ConnectionState

	// wmu orders whole frames (and HPACK state) on the wire.
	wmu  sync.Mutex
	enc  *hpack.Encoder
	hbuf bytes.Buffer
	dl   writeDeadline

	// mu guards the rest; cond is broadcast when a window opens, body
	// bytes come, a stream resets or the connection closes.
	mu        sync.Mutex
	cond      *sync.Cond
	streams   map[uint32]*h2Stream
	lastID    uint32 // highest client stream id seen
	sendWin   int64  // connection send window
	initWin   int64  // the client's SETTINGS_INITIAL_WINDOW_SIZE
	maxFrame  int    // the client's SETTINGS_MAX_FRAME_SIZE
	recvUnack int    // body bytes consumed and not yet given back by WINDOW_UPDATE
	goneAway  bool
	err       error       // set once the connection is closed
	closed    atomic.Bool // err is set: for the writers' check without mu
	idle      *time.Timer

	// Reading through the Poller: readNB reads without waiting
	// (errWouldBlock when there is nothing), rbuf keeps bytes of frames not
	// yet whole.
	watch           *Watch
	readNB          func([]byte) (int, error)
	shortReadDrains bool // a read short of the buffer has emptied the socket
	rbuf            []byte
	feed            feedReader
	fr              *http2.Framer
}

// h2Stream is one stream: a request, its body and its response.
type h2Stream struct {
	c       *h2Conn
	id      uint32
	sendWin int64

	// Under c.mu.
	cancel    context.CancelFunc // ends the request's context; nil once called
	body      []byte             // request body bytes not yet read
	bodyEnd   bool               // END_STREAM came
	bodyErr   error              // the body cannot be read further (reset, deadline)
	recvAvail int64              // what the client may still send before a WINDOW_UPDATE
	recvUnack int
	reset     bool        // RST_STREAM either way: nothing more is written
	isReset   atomic.Bool // reset, for the writer's check without c.mu
	done      bool        // the response has ended (END_STREAM sent)
	onGone    func()
	readDL    time.Time // SetReadDeadline's
	bodyTimer *time.Timer
}

// serve runs the protocol on conn. A connection owned here (not by
// net/http) comes with pc, the socket under it, and is read through the
// Poller: serve returns once it is set up. Otherwise, or without a Poller,
// serve reads it until it ends.
func (s *H2) serve(conn net.Conn, tlsState *tls.ConnectionState, sawPreface bool, pc *pollConn) {
	c, draining := s.newConn(conn, tlsState)

	if !sawPreface {
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		var p [len(http2.ClientPreface)]byte
		if _, err := io.ReadFull(conn, p[:]); err != nil || string(p[:]) != http2.ClientPreface {
			c.close(errors.New("http2: bad client preface"))
			return
		}
		conn.SetReadDeadline(time.Time{})
	}
	if err := c.writeSettings(); err != nil {
		c.close(err)
		return
	}
	if draining {
		c.goAway(http2.ErrCodeNo)
	}
	c.armIdle()

	if pc != nil && s.Opts.Poller != nil {
		if w, err := s.Opts.Poller.Watch(pc.Conn, c.onReadable); err == nil {
			if err := pc.makeNonblocking(); err != nil {
				w.Stop()
				c.close(err)
				return
			}
			c.fr = newFramer(&c.feed)
			c.readNB, c.shortReadDrains = pc.Read, true
			if tc, ok := conn.(*tls.Conn); ok {
				// A TLS read returns a record at most: short reads say
				// nothing of the socket.
				c.readNB, c.shortReadDrains = tc.Read, false
			}
			// Under mu: Shutdown may close the connection meanwhile.
			c.mu.Lock()
			c.watch = w
			closed := c.err != nil
			err := c.rearm()
			c.mu.Unlock()
			if closed {
				w.Stop()
			}
			if err != nil {
				c.close(err)
			}
			return
		}
	}
	c.readLoop()
}

// newConn registers a connection on conn, its frames not yet read, and
// reports whether the server is draining.
func (s *H2) newConn(conn net.Conn, tlsState *tls.ConnectionState) (*h2Conn, bool) {
	c := &h2Conn{s: s, conn: conn, out: writerOf(conn), tls: tlsState,
		streams: map[uint32]*h2Stream{}, sendWin: h2DefaultWindow, initWin: h2DefaultWindow, maxFrame: h2MaxFrame,
		dl: writeDeadline{timeout: s.Opts.WriteTimeout, set: conn.SetWriteDeadline}}
	c.cond = sync.NewCond(&c.mu)
	c.enc = hpack.NewEncoder(&c.hbuf)
	// No dynamic table for the headers sent (the client's SETTINGS may
	// lower the limit, never raise the size): a response's few fields are
	// not worth the table's memory on every connection.
	c.enc.SetMaxDynamicTableSizeLimit(0)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		s.conns = map[*h2Conn]struct{}{}
	}
	s.conns[c] = struct{}{}
	return c, s.draining
}

func newFramer(r io.Reader) *http2.Framer {
	fr := http2.NewFramer(nil, r)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.MaxHeaderListSize = h2MaxHeaderList
	fr.SetMaxReadFrameSize(h2MaxFrame)
	return fr
}

// readLoop reads frames on the calling goroutine until the connection ends.
func (c *h2Conn) readLoop() {
	c.fr = newFramer(c.conn)
	for {
		if err := c.frame(c.fr); err != nil {
			c.fail(err)
			return
		}
	}
}

// frame reads one frame from fr and acts on it. A stream's error resets
// the stream; any other error is the connection's end.
func (c *h2Conn) frame(fr *http2.Framer) error {
	f, err := fr.ReadFrame()
	if err != nil {
		return c.frameError(err)
	}
	return c.handle(f)
}

// onReadable reads what the connection has, without waiting, handles every
// whole frame, keeps the rest, and arms the watch again.
func (c *h2Conn) onReadable() {
	buf := readBufs.Get().(*[]byte)
	defer readBufs.Put(buf)
	for {
		n, err := c.readNB(*buf)
		if n > 0 {
			if ferr := c.consume((*buf)[:n]); ferr != nil {
				c.fail(ferr)
				return
			}
		}
		if errors.Is(err, errWouldBlock) {
			break
		}
		if err != nil || n == 0 {
			if err == nil {
				err = io.EOF
			}
			c.close(err)
			return
		}
		if c.shortReadDrains && n < len(*buf) {
			// Most likely the socket has nothing more: bytes that came
			// since are reported by the watch at once, as it is
			// level-triggered. That saves a read per wake-up.
			break
		}
	}
	c.mu.Lock()
	err := c.rearm()
	c.mu.Unlock()
	if err != nil && !errors.Is(err, errStopped) {
		c.close(err)
	}
}

// consume handles the whole frames of what was read, after the tail kept
// from the read before, and keeps the tail of this one.
func (c *h2Conn) consume(data []byte) error {
	if len(c.rbuf) > 0 {
		c.rbuf = append(c.rbuf, data...)
		data = c.rbuf
	}
	whole, err := wholeFrames(data)
	if err != nil {
		return err
	}
	c.feed.b = data[:whole]
	for len(c.feed.b) > 0 {
		if err := c.frame(c.fr); err != nil {
			return err
		}
	}
	// An idle connection keeps no buffer: the tail of a frame, if any, in
	// a slice of its own size.
	c.rbuf = append([]byte(nil), data[whole:]...)
	if len(c.rbuf) == 0 {
		c.rbuf = nil
	}
	return nil
}

// rearm arms the read watch unless the connection is closed; c.mu held.
func (c *h2Conn) rearm() error {
	if c.err != nil {
		return nil
	}
	return c.watch.Arm()
}

// readBufs are the buffers a readable connection is read into.
var readBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// feedReader hands the framer whole frames from a buffer.
type feedReader struct{ b []byte }

func (r *feedReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.ErrUnexpectedEOF // wholeFrames said a frame was whole
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

// wholeFrames returns how many leading bytes of b are whole frames, a
// header block counted only with all its CONTINUATION frames.
func wholeFrames(b []byte) (int, error) {
	off, whole, inBlock := 0, 0, false
	for len(b)-off >= 9 {
		n := int(b[off])<<16 | int(b[off+1])<<8 | int(b[off+2])
		if n > h2MaxFrame {
			return 0, http2.ConnectionError(http2.ErrCodeFrameSize)
		}
		if len(b)-off < 9+n {
			break
		}
		typ, flags := http2.FrameType(b[off+3]), http2.Flags(b[off+4])
		off += 9 + n
		switch typ {
		case http2.FrameHeaders, http2.FramePushPromise, http2.FrameContinuation:
			inBlock = !flags.Has(http2.FlagHeadersEndHeaders)
		}
		if !inBlock {
			whole = off
		}
	}
	if off-whole > h2MaxHeaderWait || len(b)-whole > h2MaxHeaderWait+9+h2MaxFrame {
		return 0, http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
	}
	return whole, nil
}

// frameError turns a read error into what to do: a stream error resets the
// stream and reading goes on; anything else ends the connection.
func (c *h2Conn) frameError(err error) error {
	var se http2.StreamError
	if errors.As(err, &se) {
		c.resetStream(se.StreamID, se.Code)
		return nil
	}
	return err
}

// fail ends the connection after a protocol error (GOAWAY with its code)
// or a read error.
func (c *h2Conn) fail(err error) {
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		c.goAway(http2.ErrCode(ce))
	}
	c.close(err)
}

// handle acts on one frame.
func (c *h2Conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		return c.writeFrame(http2.FramePing, http2.FlagPingAck, 0, f.Data[:])
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		st := c.streams[f.StreamID]
		if st == nil && f.StreamID > c.lastID {
			c.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeProtocol) // an idle stream
		}
		c.mu.Unlock()
		if st != nil {
			c.endStream(st, errors.New("http2: stream reset by the client"))
		}
	case *http2.GoAwayFrame:
		// The client opens no more streams; the ones it has go on.
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil // PRIORITY, unknown types
}

func (c *h2Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		// The client now knows our header table size is 0: every header
		// block it sends from here on starts by emptying its table, so
		// nothing indexed before (the first request's fields, often) is
		// referred to again. A fresh decoder drops the table's memory,
		// which evicting its entries would keep.
		c.fr.ReadMetaHeaders = hpack.NewDecoder(0, nil)
		return nil
	}
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			c.mu.Lock()
			delta := int64(s.Val) - c.initWin
			c.initWin = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > 1<<31-1 {
					c.mu.Unlock()
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
			}
			c.cond.Broadcast()
			c.mu.Unlock()
		case http2.SettingMaxFrameSize:
			c.mu.Lock()
			c.maxFrame = int(s.Val)
			c.mu.Unlock()
		}
		// SETTINGS_HEADER_TABLE_SIZE needs nothing: the encoder's table is
		// 0, within any limit.
		return nil
	})
	if err != nil {
		return err
	}
	return c.writeFrame(http2.FrameSettings, http2.FlagSettingsAck, 0, nil)
}

func (c *h2Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		c.sendWin += int64(f.Increment)
		if c.sendWin > 1<<31-1 {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	} else if st := c.streams[f.StreamID]; st != nil {
		st.sendWin += int64(f.Increment)
		if st.sendWin > 1<<31-1 {
			c.mu.Unlock()
			c.resetStream(st.id, http2.ErrCodeFlowControl)
			c.mu.Lock()
			return nil
		}
	}
	c.cond.Broadcast()
	return nil
}

func (c *h2Conn) onData(f *http2.DataFrame) error {
	n := int64(f.Length) // padding counts against the windows too
	c.mu.Lock()
	st := c.streams[f.StreamID]
	if st == nil || st.bodyEnd || st.bodyErr != nil {
		// A stream closed or reset: its bytes are given back to the
		// connection's window at once.
		c.recvUnack += int(n)
		c.mu.Unlock()
		if st == nil && f.StreamID > c.lastID {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if st == nil || st.bodyEnd {
			c.resetStream(f.StreamID, http2.ErrCodeStreamClosed)
		}
		return c.giveBack(nil)
	}
	if n > st.recvAvail {
		c.mu.Unlock()
		c.resetStream(st.id, http2.ErrCodeFlowControl)
		return nil
	}
	st.recvAvail -= n
	st.body = append(st.body, f.Data()...)
	st.recvUnack += int(n) - len(f.Data()) // padding is consumed on arrival
	c.recvUnack += int(n) - len(f.Data())
	if f.StreamEnded() {
		st.bodyEnd = true
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	return nil
}

// giveBack sends the WINDOW_UPDATEs owed for body bytes consumed, once a
// quarter of a window is owed (or the stream's body has ended).
func (c *h2Conn) giveBack(st *h2Stream) error {
	c.mu.Lock()
	var connInc, streamInc int
	if c.recvUnack >= h2ConnWindow/4 {
		connInc, c.recvUnack = c.recvUnack, 0
	}
	if st != nil && !st.bodyEnd && st.bodyErr == nil && st.recvUnack >= h2StreamWindow/4 {
		streamInc, st.recvUnack = st.recvUnack, 0
		st.recvAvail += int64(streamInc)
	}
	c.mu.Unlock()
	var b [4]byte
	if connInc > 0 {
		putUint32(b[:], uint32(connInc))
		if err := c.writeFrame(http2.FrameWindowUpdate, 0, 0, b[:]); err != nil {
			return err
		}
	}
	if streamInc > 0 {
		putUint32(b[:], uint32(streamInc))
		return c.writeFrame(http2.FrameWindowUpdate, 0, st.id, b[:])
	}
	return nil
}

func (c *h2Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	if st := c.streams[id]; st != nil {
		// Trailers: they end the body; their fields are dropped.
		c.mu.Unlock()
		if !f.StreamEnded() {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		c.mu.Lock()
		st.bodyEnd = true
		c.cond.Broadcast()
		c.mu.Unlock()
		return nil
	}
	if id%2 == 0 || id <= c.lastID {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.lastID = id
	if c.goneAway || c.err != nil {
		c.mu.Unlock()
		return c.resetStream(id, http2.ErrCodeRefusedStream)
	}
	if len(c.streams) >= h2MaxStreams {
		c.mu.Unlock()
		return c.resetStream(id, http2.ErrCodeRefusedStream)
	}
	// Counted before GOAWAY can be sent (goAway takes c.mu), so that
	// Shutdown's wait, which starts after every GOAWAY, sees it.
	c.s.handlers.Add(1)
	c.mu.Unlock()

	req, err := c.newRequest(f)
	if err != nil {
		c.s.handlers.Done()
		return c.resetStream(id, http2.ErrCodeProtocol)
	}
	// Not a child of a connection context: close ends every stream it
	// knows of, and a parent's table of children would outlive them.
	ctx, cancel := context.WithCancel(context.Background())
	st := &h2Stream{c: c, id: id, cancel: cancel, recvAvail: h2StreamWindow, bodyEnd: f.StreamEnded()}
	c.mu.Lock()
	st.sendWin = c.initWin
	c.streams[id] = st
	if c.idle != nil {
		c.idle.Stop()
	}
	closed := c.err != nil // close has been and did not see st
	c.mu.Unlock()
	if closed {
		cancel()
	}
	if !st.bodyEnd {
		req.Body = &h2Body{st: st}
	}
	req = req.WithContext(ctx)
	w := &h2Response{st: st, header: http.Header{}, head: req.Method == http.MethodHead}
	go c.runHandler(w, req)
	return nil
}

// newRequest makes the http.Request of a HEADERS frame.
func (c *h2Conn) newRequest(f *http2.MetaHeadersFrame) (*http.Request, error) {
	method, path := f.PseudoValue("method"), f.PseudoValue("path")
	scheme, authority := f.PseudoValue("scheme"), f.PseudoValue("authority")
	if method == "" || method == http.MethodConnect || path == "" || scheme == "" {
		return nil, errors.New("http2: missing or unsupported pseudo-header")
	}
	u, err := url.ParseRequestURI(path)
	if err != nil {
		return nil, err
	}
	h := make(http.Header, len(f.Fields))
	for _, hf := range f.RegularFields() {
		k := http.CanonicalHeaderKey(hf.Name)
		if k == "Cookie" && len(h[k]) > 0 {
			h[k][0] += "; " + hf.Value // RFC 9113 8.2.3: split cookies joined back
			continue
		}
		h[k] = append(h[k], hf.Value)
	}
	if authority == "" {
		authority = h.Get("Host")
	}
	cl := int64(-1)
	if f.StreamEnded() {
		cl = 0
	} else if v := h.Get("Content-Length"); v != "" {
		if cl, err = strconv.ParseInt(v, 10, 64); err != nil || cl < 0 {
			return nil, errors.New("http2: bad content-length")
		}
	}
	return &http.Request{
		Method: method, URL: u, Proto: "HTTP/2.0", ProtoMajor: 2, Header: h,
		Body: http.NoBody, ContentLength: cl, Host: authority,
		RemoteAddr: c.conn.RemoteAddr().String(), RequestURI: path, TLS: c.tls,
	}, nil
}

func (c *h2Conn) runHandler(w *h2Response, r *http.Request) {
	defer c.s.handlers.Done()
	defer func() {
		if p := recover(); p != nil {
			if p != http.ErrAbortHandler && c.s.Log != nil {
				c.s.Log.Error("http2 handler panic", "path", r.URL.Path, "panic", fmt.Sprint(p))
			}
			c.resetStream(w.st.id, http2.ErrCodeInternal)
			c.endStream(w.st, errors.New("http2: handler panicked"))
		}
	}()
	c.s.Handler.ServeHTTP(w, r)
	w.finish()
	if w.detached {
		// As with net/http, the request's context ends when its handler
		// returns; a detached stream lives on without it.
		c.mu.Lock()
		cancel := w.st.cancel
		w.st.cancel = nil
		c.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	}
}

// endStream forgets st: its context ends, a reader of its body gets err,
// and a detached stream hears that the client is gone.
func (c *h2Conn) endStream(st *h2Stream, err error) {
	c.mu.Lock()
	if c.streams[st.id] != st {
		c.mu.Unlock()
		return
	}
	delete(c.streams, st.id)
	st.reset = true
	st.isReset.Store(true)
	if st.bodyErr == nil {
		st.bodyErr = err
	}
	if st.bodyTimer != nil {
		st.bodyTimer.Stop()
	}
	// What the handler never read is given back to the connection.
	c.recvUnack += len(st.body) + st.recvUnack
	st.body = nil
	gone := st.onGone
	st.onGone = nil
	cancel := st.cancel
	st.cancel = nil
	c.cond.Broadcast()
	c.armIdleLocked()
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if gone != nil {
		gone()
	}
	c.giveBack(nil)
}

// resetStream sends RST_STREAM for id and forgets the stream.
func (c *h2Conn) resetStream(id uint32, code http2.ErrCode) error {
	c.mu.Lock()
	st := c.streams[id]
	c.mu.Unlock()
	if st != nil {
		c.endStream(st, fmt.Errorf("http2: stream reset (%v)", code))
	}
	var b [4]byte
	putUint32(b[:], uint32(code))
	return c.writeFrame(http2.FrameRSTStream, 0, id, b[:])
}

// armIdle starts the idle timer if the connection has no stream.
func (c *h2Conn) armIdle() {
	c.mu.Lock()
	c.armIdleLocked()
	c.mu.Unlock()
}

func (c *h2Conn) armIdleLocked() {
	if len(c.streams) > 0 || c.err != nil {
		return
	}
	if c.goneAway {
		// After GOAWAY a connection's last stream closes it.
		go c.close(net.ErrClosed)
		return
	}
	if c.s.IdleTimeout <= 0 {
		return
	}
	if c.idle == nil {
		c.idle = time.AfterFunc(c.s.IdleTimeout, func() {
			c.mu.Lock()
			idle := len(c.streams) == 0
			c.mu.Unlock()
			if idle {
				c.goAway(http2.ErrCodeNo)
				c.close(errors.New("http2: idle"))
			}
		})
		return
	}
	c.idle.Reset(c.s.IdleTimeout)
}

// goAway tells the client to open no more streams on this connection.
func (c *h2Conn) goAway(code http2.ErrCode) {
	c.mu.Lock()
	if c.goneAway || c.err != nil {
		c.mu.Unlock()
		return
	}
	c.goneAway = true
	last := c.lastID
	idle := len(c.streams) == 0
	c.mu.Unlock()
	var b [8]byte
	putUint32(b[:4], last)
	putUint32(b[4:], uint32(code))
	c.writeFrame(http2.FrameGoAway, 0, 0, b[:])
	if idle && code == http2.ErrCodeNo {
		c.close(net.ErrClosed)
	}
}

// close ends the connection and every stream on it, once.
func (c *h2Conn) close(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	c.closed.Store(true)
	streams := make([]*h2Stream, 0, len(c.streams))
	for _, st := range c.streams {
		streams = append(streams, st)
	}
	if c.idle != nil {
		c.idle.Stop()
	}
	c.cond.Broadcast()
	watch := c.watch
	c.mu.Unlock()
	if watch != nil {
		watch.Stop()
	}
	c.conn.Close()
	for _, st := range streams {
		c.endStream(st, err)
	}
	c.s.mu.Lock()
	delete(c.s.conns, c)
	c.s.mu.Unlock()
	c.s.logf("http2 connection closed", "err", err)
}

// writeSettings sends the server's SETTINGS and opens the connection's
// receive window to h2ConnWindow.
func (c *h2Conn) writeSettings() error {
	var p []byte
	for _, s := range []http2.Setting{
		{ID: http2.SettingMaxConcurrentStreams, Val: h2MaxStreams},
		{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
		{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderList},
		{ID: http2.SettingHeaderTableSize, Val: 0}, // see onSettings
	} {
		p = append(p, byte(s.ID>>8), byte(s.ID), byte(s.Val>>24), byte(s.Val>>16), byte(s.Val>>8), byte(s.Val))
	}
	var wu [4]byte
	putUint32(wu[:], h2ConnWindow-h2DefaultWindow)
	b := appendFrameHeader(nil, len(p), http2.FrameSettings, 0, 0)
	b = append(b, p...)
	b = appendFrameHeader(b, 4, http2.FrameWindowUpdate, 0, 0)
	b = append(b, wu[:]...)
	return c.write(net.Buffers{b})
}

// writeFrame writes one frame.
func (c *h2Conn) writeFrame(t http2.FrameType, flags http2.Flags, stream uint32, payload []byte) error {
	var h [9]byte
	appendFrameHeader(h[:0], len(payload), t, flags, stream)
	return c.write(net.Buffers{h[:], payload})
}

// write writes bufs, whole frames, in one go under the write deadline. A
// failed write ends the connection: the frames after it cannot follow.
func (c *h2Conn) write(bufs net.Buffers) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked(bufs)
}

func (c *h2Conn) writeLocked(bufs net.Buffers) error {
	if c.closed.Load() {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.err
	}
	if err := c.dl.refresh(); err != nil {
		go c.close(err)
		return err
	}
	var err error
	_, bare := c.out.(*net.TCPConn)
	switch {
	case len(bufs) == 1:
		_, err = c.out.Write(bufs[0])
	case bare && buffersLen(bufs) > gatherMax:
		_, err = bufs.WriteTo(c.out)
	default:
		// Through TLS each buffer would be a record of its own: one
		// write, one record (or a few, for a large batch), instead. On a
		// bare socket a small write, an event's DATA frame and its
		// header, is cheaper copied and written than sent with writev.
		b := writeBufs.Get().(*[]byte)
		for _, p := range bufs {
			*b = append(*b, p...)
		}
		_, err = c.out.Write(*b)
		if cap(*b) <= 64<<10 {
			*b = (*b)[:0]
			writeBufs.Put(b)
		}
	}
	if err != nil {
		go c.close(err)
		return err
	}
	return nil
}

// gatherMax is the size up to which a bare socket's write of several
// buffers is copied into one: a copy of a few KiB costs less than writev's
// iovec array and the kernel's import of it.
const gatherMax = 4 << 10

func buffersLen(bufs net.Buffers) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

// writeBufs gather a write's frames for a connection that is not a bare
// socket (TLS).
var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

// writeHeaders writes a HEADERS frame (and CONTINUATIONs) for st.
func (c *h2Conn) writeHeaders(st *h2Stream, status int, h http.Header, end bool) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.hbuf.Reset()
	c.enc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	for k, vs := range h {
		lk := strings.ToLower(k)
		switch lk {
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
			continue // connection-specific: not in HTTP/2
		}
		for _, v := range vs {
			c.enc.WriteField(hpack.HeaderField{Name: lk, Value: v})
		}
	}
	c.mu.Lock()
	maxFrame := c.maxFrame
	c.mu.Unlock()
	block := c.hbuf.Bytes()
	var bufs net.Buffers
	typ, flags := http2.FrameHeaders, http2.Flags(0)
	if end {
		flags |= http2.FlagHeadersEndStream
	}
	for first := true; first || len(block) > 0; first = false {
		n := min(len(block), maxFrame)
		f := flags
		if n == len(block) {
			f |= http2.FlagHeadersEndHeaders
		}
		bufs = append(bufs, appendFrameHeader(nil, n, typ, f, st.id), block[:n])
		block = block[n:]
		typ, flags = http2.FrameContinuation, 0
	}
	err := c.writeLocked(bufs)
	c.hbuf.Reset()
	if c.hbuf.Cap() > 4096 {
		c.hbuf = bytes.Buffer{}
	}
	return err
}

// takeWindow waits until st may send, then takes up to want bytes of both
// windows. It fails when the stream or connection ends, or at the
// deadline: *at, set to timeout from now at the first wait if zero.
func (c *h2Conn) takeWindow(st *h2Stream, want int, timeout time.Duration, at *time.Time) (int, error) {
	// Most writes find both windows open: no deferred calls for them.
	c.mu.Lock()
	if c.err == nil && !st.reset {
		if n := min(int64(want), c.sendWin, st.sendWin, int64(c.maxFrame)); n > 0 {
			c.sendWin -= n
			st.sendWin -= n
			c.mu.Unlock()
			return int(n), nil
		}
	}
	c.mu.Unlock()
	return c.waitWindow(st, want, timeout, at)
}

// waitWindow is takeWindow's wait, for when a window is shut.
func (c *h2Conn) waitWindow(st *h2Stream, want int, timeout time.Duration, at *time.Time) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		switch {
		case c.err != nil:
			return 0, c.err
		case st.reset:
			return 0, errStreamReset
		}
		if n := min(int64(want), c.sendWin, st.sendWin, int64(c.maxFrame)); n > 0 {
			c.sendWin -= n
			st.sendWin -= n
			return int(n), nil
		}
		if at.IsZero() && timeout > 0 {
			*at = time.Now().Add(timeout)
		}
		if !at.IsZero() {
			d := time.Until(*at)
			if d <= 0 {
				return 0, os.ErrDeadlineExceeded
			}
			if timer == nil {
				timer = time.AfterFunc(d, func() {
					c.mu.Lock()
					c.cond.Broadcast()
					c.mu.Unlock()
				})
			}
		}
		c.cond.Wait()
	}
}

var errStreamReset = errors.New("http2: stream reset")

// h2Scratch is the buffers of one write, kept by a stream between writes.
type h2Scratch struct {
	bufs net.Buffers
	hdrs []byte
}

// writeData writes pieces as DATA frames on st, as the windows allow,
// packed into as few frames as the client's frame size permits, with one
// write; the stream ends after them when end is set. A wait for a window
// gives up at the deadline: at, or timeout from the first wait when at is
// zero (and timeout positive). sc, if not nil, lends the write its
// buffers. The pieces slice's elements are changed.
func (c *h2Conn) writeData(st *h2Stream, pieces [][]byte, end bool, timeout time.Duration, at time.Time, sc *h2Scratch) error {
	total := 0
	for _, p := range pieces {
		total += len(p)
	}
	if total == 0 {
		if !end {
			return nil
		}
		return c.writeStream(st, net.Buffers{appendFrameHeader(nil, 0, http2.FrameData, http2.FlagDataEndStream, st.id)})
	}
	if sc == nil {
		sc = new(h2Scratch)
	}
	bufs, hdrs := sc.bufs[:0], sc.hdrs[:0]
	taken := 0 // window taken for frames not yet written
	var err error
	for total > 0 {
		var n int
		if n, err = c.takeWindow(st, total, timeout, &at); err != nil {
			break
		}
		taken += n
		total -= n
		flags := http2.Flags(0)
		if end && total == 0 {
			flags = http2.FlagDataEndStream
		}
		if cap(hdrs)-len(hdrs) < 9 {
			hdrs = make([]byte, 0, 9*4)
		}
		hdrs = appendFrameHeader(hdrs, n, http2.FrameData, flags, st.id)
		bufs = append(bufs, hdrs[len(hdrs)-9:])
		for n > 0 {
			p := pieces[0]
			if len(p) > n {
				bufs = append(bufs, p[:n])
				pieces[0] = p[n:]
				break
			}
			bufs = append(bufs, p)
			n -= len(p)
			pieces = pieces[1:]
		}
		// Write what the windows gave before waiting for more.
		if total > 0 && c.windowShut(st) {
			w := bufs
			if err = c.writeStream(st, w); err != nil {
				break
			}
			taken = 0
			clear(bufs)
			bufs, hdrs = bufs[:0], hdrs[:0]
		}
	}
	if err == nil {
		w := bufs
		if err = c.writeStream(st, w); err == nil {
			taken = 0
		}
	}
	if taken > 0 {
		// The stream ended before the frames went: the connection's window
		// is not spent.
		c.mu.Lock()
		c.sendWin += int64(taken)
		c.cond.Broadcast()
		c.mu.Unlock()
	}
	// Kept for the next write: small, and holding no event's bytes.
	clear(bufs)
	if cap(bufs) <= 16 {
		sc.bufs = bufs[:0]
	} else {
		sc.bufs = nil
	}
	sc.hdrs = hdrs[:0]
	return err
}

// writeStream writes frames of st unless st has been reset: nothing may
// follow a RST_STREAM on its stream.
func (c *h2Conn) writeStream(st *h2Stream, bufs net.Buffers) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if st.isReset.Load() {
		return errStreamReset
	}
	return c.writeLocked(bufs)
}

// windowShut reports whether st can send nothing more now.
func (c *h2Conn) windowShut(st *h2Stream) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sendWin <= 0 || st.sendWin <= 0
}

func appendFrameHeader(b []byte, length int, t http2.FrameType, flags http2.Flags, stream uint32) []byte {
	return append(b, byte(length>>16), byte(length>>8), byte(length), byte(t), byte(flags),
		byte(stream>>24)&0x7f, byte(stream>>16), byte(stream>>8), byte(stream))
}

func putUint32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}
