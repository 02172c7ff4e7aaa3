package transport

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// maxClientPayload is the most a client may send in one frame. Clients have
// nothing to say on this stream but control frames; a few small data frames
// are read and ignored, anything bigger closes the connection with 1009.
const maxClientPayload = 4 << 10

// WS is a WebSocket stream on a hijacked connection.
//
// The upgrade hijacks the connection from net/http and keeps neither of its
// bufio buffers: bytes the client sent after the handshake are carried over
// once, and from then on frames go straight to the socket — event frames as
// the shared bytes of Encode, several at once with writev (net.Buffers).
//
// Client frames (pongs, pings, the close) are read when a Poller reports
// the socket readable, on a goroutine that lives for one frame; without a
// Poller, or on TLS, a goroutine of the stream's own waits in a read.
type WS struct {
	conn net.Conn
	out  net.Conn // conn, or the socket under it, to write to (writerOf)
	opts Options
	gone func() // called once when the client has gone

	mu     sync.Mutex // serializes writes: handler, reader (pong, close)
	closed bool       // a close frame was sent
	bufs   net.Buffers
	dl     writeDeadline // guarded by mu

	rmu      sync.Mutex   // one reader of client frames at a time
	watch    *Watch       // nil: readLoop reads on a goroutine of its own
	lastRead atomic.Int64 // UnixNano of the handshake or the last client frame
	endOnce  sync.Once
	ended    chan struct{} // closed once the socket is closed
}

// UpgradeWS answers the WebSocket handshake on w and starts reading client
// frames. gone is called once when the client closes or breaks the
// connection, so the handler can stop waiting.
func UpgradeWS(w http.ResponseWriter, r *http.Request, opts Options, gone func()) (*WS, error) {
	u := ws.HTTPUpgrader{Timeout: opts.WriteTimeout}
	conn, rw, _, err := u.Upgrade(r, w)
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		return nil, err
	}
	early := rw.Reader.Buffered() > 0
	if early {
		b, _ := rw.Reader.Peek(rw.Reader.Buffered())
		conn = &prefixConn{Conn: conn, r: io.MultiReader(bytes.NewReader(bytes.Clone(b)), conn)}
	}
	s := &WS{conn: conn, out: writerOf(conn), opts: opts, gone: gone, ended: make(chan struct{}),
		dl: writeDeadline{timeout: opts.WriteTimeout, set: conn.SetWriteDeadline}}
	s.lastRead.Store(time.Now().UnixNano())
	if !early { // bytes carried over are in prefixConn, where epoll cannot see them
		watched, err := watchReads(opts, conn, &s.watch, s.readOne)
		if err != nil {
			s.end()
			return nil, err
		}
		if watched {
			return s, nil
		}
	}
	go s.readLoop()
	return s, nil
}

func (s *WS) Kind() string   { return "ws" }
func (s *WS) Proto() string  { return "HTTP/1.1" }
func (s *WS) Format() Format { return FormatWS }

// WriteEvents writes every frame with one write (writeFrames) under a
// write deadline.
func (s *WS) WriteEvents(frames [][]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.setDeadline(); err != nil {
		return err
	}
	return writeFrames(s.out, &s.bufs, frames)
}

func (s *WS) WriteNotice(name string, payload []byte) error {
	b := noticeBytes(true, name, payload)
	return s.writeFrame(ws.NewTextFrame(b[:len(b)-1])) // the JSON line without its newline
}

// ErrSilent is Keepalive's error for a WebSocket client that sent nothing,
// not even a pong, for three keepalive intervals: it is dropped.
var ErrSilent = errors.New("transport: websocket client silent for three keepalive intervals")

// Keepalive sends a ping; the client's pong keeps the stream alive.
func (s *WS) Keepalive() error {
	if k := s.opts.Keepalive; k > 0 && time.Since(time.Unix(0, s.lastRead.Load())) > 3*k {
		return ErrSilent
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.setDeadline(); err != nil {
		return err
	}
	_, err := s.out.Write(ws.CompiledPing)
	return err
}

// closeLinger bounds how long a closing connection waits for the client's
// close frame, or drains what the client still sends.
const closeLinger = 2 * time.Second

// Close sends a close frame with the reason's code, then waits (up to
// closeLinger) for the client's close before closing the socket: closing
// while the client's bytes are unread would reset the connection, and the
// client could lose the close frame and its code. For ReasonGone it only
// closes the socket: a client that left or stopped reading hears nothing.
func (s *WS) Close(reason Reason) error {
	if reason == ReasonGone {
		s.end()
		return nil
	}
	code := map[Reason]ws.StatusCode{
		ReasonEnded:    ws.StatusNormalClosure,
		ReasonShutdown: ws.StatusGoingAway,
		ReasonPolicy:   ws.StatusPolicyViolation,
		ReasonError:    ws.StatusInternalServerError,
	}[reason]
	err := s.sendClose(code, reason.String())
	linger := time.Now().Add(closeLinger)
	s.conn.SetReadDeadline(linger)
	if s.watch == nil {
		<-s.ended // readLoop ends on the client's close, an error or the deadline
		return err
	}
	// No more poller calls: this goroutine reads the rest itself, once a
	// frame being read (which the deadline above cuts short) is done.
	s.watch.Stop()
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.conn.SetReadDeadline(linger)
	for s.readFrame() {
	}
	s.end()
	return err
}

func (s *WS) sendClose(code ws.StatusCode, text string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if err := s.setDeadline(); err != nil {
		return err
	}
	var body []byte // code 0: a close with no status, the answer to one
	if code != 0 {
		body = ws.NewCloseFrameBody(code, text)
	}
	return ws.WriteFrame(s.out, ws.NewCloseFrame(body))
}

func (s *WS) writeFrame(f ws.Frame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.setDeadline(); err != nil {
		return err
	}
	return ws.WriteFrame(s.out, f)
}

func (s *WS) setDeadline() error { return s.dl.refresh() }

// frameTimeout bounds how long a client frame that has begun may take to
// arrive whole, when the Poller has said it is coming.
const frameTimeout = 10 * time.Second

// readOne is the Poller's call: the socket is readable. It reads one frame
// (or the close, or the error) and arms the watch for the next.
func (s *WS) readOne() {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	select {
	case <-s.ended:
		return
	default:
	}
	s.conn.SetReadDeadline(time.Now().Add(frameTimeout))
	if !s.readFrame() {
		s.end()
		return
	}
	// Stopped means Close is waiting to read the client's close frame
	// itself: leave the connection open for it.
	if err := s.watch.Arm(); err != nil && !errors.Is(err, errStopped) {
		s.end()
	}
}

// readLoop reads client frames on a goroutine of its own, when there is no
// Poller. (A client silent too long is found by Keepalive, as with one.)
func (s *WS) readLoop() {
	defer s.end()
	for s.readFrame() {
	}
}

// readFrame reads one client frame and reports whether the connection
// goes on: pings are answered, pongs and small data frames only prove the
// client alive, a close is answered (see closeReply). Frames that break the
// protocol (unmasked, reserved bits or opcodes, oversized control frames)
// close with 1002, as RFC 6455 says, data over maxClientPayload with 1009.
func (s *WS) readFrame() bool {
	var hb [ws.MaxHeaderSize - 2]byte
	h, err := ws.ReadHeaderBuffer(s.conn, hb[:])
	if err != nil {
		if errors.Is(err, ws.ErrHeaderLengthMSB) || errors.Is(err, ws.ErrHeaderLengthUnexpected) {
			s.refuse(ws.StatusProtocolError, "malformed frame")
		}
		return false
	}
	switch {
	case !h.Masked || h.Rsv != 0 || h.OpCode.IsReserved() ||
		(h.OpCode.IsControl() && (h.Length > 125 || !h.Fin)):
		s.refuse(ws.StatusProtocolError, "malformed frame")
		return false
	case h.Length > maxClientPayload:
		s.refuse(ws.StatusMessageTooBig, "this stream takes no messages")
		return false
	}
	s.lastRead.Store(time.Now().UnixNano())
	if !h.OpCode.IsControl() {
		// Nothing to say on this stream: read past it.
		_, err := io.CopyN(io.Discard, s.conn, h.Length)
		return err == nil
	}
	var ctl [125]byte
	p := ctl[:h.Length]
	if _, err := io.ReadFull(s.conn, p); err != nil {
		return false
	}
	ws.Cipher(p, h.Mask, 0)
	switch h.OpCode {
	case ws.OpPing:
		return s.writeFrame(ws.NewPongFrame(p)) == nil
	case ws.OpClose:
		code, text := closeReply(p)
		s.sendClose(code, text)
		return false
	}
	return true
}

// closeReply is the close frame that answers a client's close with
// payload p, by RFC 6455 (5.5.1, 7.4): no status is answered with no
// status (1005 is never put on the wire); a valid code is echoed; a
// one-byte payload, or a code that is reserved, unassigned or not to be
// sent (1004-1006, 1015, below 1000, 1016-2999, above 4999), is a protocol error,
// 1002; a reason that is not UTF-8 is 1007.
func closeReply(p []byte) (ws.StatusCode, string) {
	switch len(p) {
	case 0:
		return 0, ""
	case 1:
		return ws.StatusProtocolError, "close payload of one byte"
	}
	code, reason := ws.ParseCloseFrameData(p)
	switch err := ws.CheckCloseFrameData(code, reason); {
	case errors.Is(err, ws.ErrProtocolInvalidUTF8):
		return ws.StatusInvalidFramePayloadData, "close reason is not UTF-8"
	case err != nil, code < 1000, code > 4999:
		return ws.StatusProtocolError, "invalid close code"
	}
	return code, ""
}

// refuse closes on a client's broken frame: the close frame, then the
// client's remaining bytes read and dropped (for at most closeLinger), so
// that the socket closes cleanly rather than with a reset that could make
// the client lose the close code.
func (s *WS) refuse(code ws.StatusCode, text string) {
	s.sendClose(code, text)
	s.conn.SetReadDeadline(time.Now().Add(closeLinger))
	io.Copy(io.Discard, s.conn)
}

// Abort closes the connection under the stream, from any goroutine: a
// write under way fails at once. It is for a server that cannot wait for
// the write timeout; Close is still called, last.
func (s *WS) Abort() { s.end() }

func (s *WS) end() {
	s.endOnce.Do(func() {
		if s.watch != nil {
			s.watch.Stop()
		}
		s.conn.Close()
		close(s.ended)
		if s.gone != nil {
			s.gone()
		}
	})
}

// prefixConn reads bytes the client sent with its handshake before the rest.
type prefixConn struct {
	net.Conn
	r io.Reader
}

func (c *prefixConn) Read(p []byte) (int, error) { return c.r.Read(p) }
