package transport

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
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
// An idle connection so costs its two goroutines and a few hundred bytes.
type WS struct {
	conn net.Conn
	opts Options
	gone func() // called once when the client has gone

	mu       sync.Mutex // serializes writes: handler, reader (pong, close)
	closed   bool       // a close frame was sent
	bufs     net.Buffers
	dl       writeDeadline // guarded by mu
	endOnce  sync.Once
	readDone chan struct{} // closed when readLoop has returned and the socket is closed
}

// UpgradeWS answers the WebSocket handshake on w and starts the reader of
// client frames. gone is called (once, from the reader) when the client
// closes or breaks the connection, so the handler can stop waiting.
func UpgradeWS(w http.ResponseWriter, r *http.Request, opts Options, gone func()) (*WS, error) {
	u := ws.HTTPUpgrader{Timeout: opts.WriteTimeout}
	conn, rw, _, err := u.Upgrade(r, w)
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		return nil, err
	}
	if n := rw.Reader.Buffered(); n > 0 {
		early, _ := rw.Reader.Peek(n)
		conn = &prefixConn{Conn: conn, r: io.MultiReader(bytes.NewReader(bytes.Clone(early)), conn)}
	}
	s := &WS{conn: conn, opts: opts, gone: gone, readDone: make(chan struct{}),
		dl: writeDeadline{timeout: opts.WriteTimeout, set: conn.SetWriteDeadline}}
	go s.readLoop()
	return s, nil
}

func (s *WS) Kind() string   { return "ws" }
func (s *WS) Proto() string  { return "HTTP/1.1" }
func (s *WS) Format() Format { return FormatWS }

// WriteEvents writes every frame with one writev under a write deadline.
func (s *WS) WriteEvents(frames [][]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bufs = append(s.bufs[:0], frames...)
	b := s.bufs // WriteTo consumes its receiver; keep s.bufs for reuse
	if err := s.setDeadline(); err != nil {
		return err
	}
	_, err := b.WriteTo(s.conn)
	clear(s.bufs)
	return err
}

func (s *WS) WriteNotice(name string, payload []byte) error {
	b := noticeBytes(true, name, payload)
	return s.writeFrame(ws.NewTextFrame(b[:len(b)-1])) // the JSON line without its newline
}

// Keepalive sends a ping; the client's pong keeps the read deadline alive.
func (s *WS) Keepalive() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.setDeadline(); err != nil {
		return err
	}
	_, err := s.conn.Write(ws.CompiledPing)
	return err
}

// closeLinger bounds how long a closing connection waits for the client's
// close frame, or drains what the client still sends.
const closeLinger = 2 * time.Second

// Close sends a close frame with the reason's code, then waits (up to
// closeLinger) for the client's close before closing the socket: closing
// while the client's bytes are unread would reset the connection, and the
// client could lose the close frame and its code.
func (s *WS) Close(reason Reason) error {
	code := map[Reason]ws.StatusCode{
		ReasonEnded:    ws.StatusNormalClosure,
		ReasonShutdown: ws.StatusGoingAway,
		ReasonPolicy:   ws.StatusPolicyViolation,
		ReasonError:    ws.StatusInternalServerError,
		ReasonGone:     ws.StatusNormalClosure,
	}[reason]
	err := s.sendClose(code, reason.String())
	s.conn.SetReadDeadline(time.Now().Add(closeLinger))
	<-s.readDone
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
	return ws.WriteFrame(s.conn, ws.NewCloseFrame(ws.NewCloseFrameBody(code, text)))
}

func (s *WS) writeFrame(f ws.Frame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.setDeadline(); err != nil {
		return err
	}
	return ws.WriteFrame(s.conn, f)
}

func (s *WS) setDeadline() error { return s.dl.refresh() }

// readLoop reads client frames: pings are answered, pongs and small data
// frames only prove the client alive, a close is echoed. Frames that break
// the protocol (unmasked, reserved bits or opcodes, oversized control
// frames) close with 1008, data over maxClientPayload with 1009. Nothing
// for three keepalive intervals drops the client.
func (s *WS) readLoop() {
	defer s.end()
	var hb [ws.MaxHeaderSize - 2]byte
	var ctl [125]byte // control frames only; data frames are discarded unread
	for {
		if s.opts.Keepalive > 0 {
			s.conn.SetReadDeadline(time.Now().Add(3 * s.opts.Keepalive))
		}
		h, err := ws.ReadHeaderBuffer(s.conn, hb[:])
		if err != nil {
			if errors.Is(err, ws.ErrHeaderLengthMSB) || errors.Is(err, ws.ErrHeaderLengthUnexpected) {
				s.refuse(ws.StatusPolicyViolation, "malformed frame")
			}
			return
		}
		switch {
		case !h.Masked || h.Rsv != 0 || h.OpCode.IsReserved() ||
			(h.OpCode.IsControl() && (h.Length > 125 || !h.Fin)):
			s.refuse(ws.StatusPolicyViolation, "malformed frame")
			return
		case h.Length > maxClientPayload:
			s.refuse(ws.StatusMessageTooBig, "this stream takes no messages")
			return
		}
		if !h.OpCode.IsControl() {
			// Nothing to say on this stream: read past it. (No buffer of
			// our own on this goroutine's stack keeps an idle
			// connection's stack at its minimum.)
			if _, err := io.CopyN(io.Discard, s.conn, h.Length); err != nil {
				return
			}
			continue
		}
		p := ctl[:h.Length]
		if _, err := io.ReadFull(s.conn, p); err != nil {
			return
		}
		ws.Cipher(p, h.Mask, 0)
		switch h.OpCode {
		case ws.OpPing:
			if s.writeFrame(ws.NewPongFrame(p)) != nil {
				return
			}
		case ws.OpClose:
			code, _ := ws.ParseCloseFrameData(p)
			if code.Empty() {
				code = ws.StatusNormalClosure
			}
			s.sendClose(code, "")
			return
		}
	}
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

func (s *WS) end() {
	s.endOnce.Do(func() {
		s.conn.Close()
		close(s.readDone)
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
