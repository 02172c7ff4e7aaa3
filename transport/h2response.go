package transport

import (
	"errors"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	"golang.org/x/net/http2"
)

// h2Response is the http.ResponseWriter of a request served by H2. The
// body is buffered up to a frame's worth and sent on Flush, when the
// buffer fills, or when the handler returns; a response that the handler
// finished without flushing gets a Content-Length.
type h2Response struct {
	st          *h2Stream
	header      http.Header
	status      int
	wroteHeader bool
	sentHeader  bool
	head        bool // a HEAD request: no body is sent
	detached    bool // DetachSSE took the stream over
	buf         []byte
	deadline    time.Time // SetWriteDeadline's
}

func (w *h2Response) Header() http.Header { return w.header }

func (w *h2Response) WriteHeader(code int) {
	if w.wroteHeader || w.detached || code < 200 {
		return // informational responses are not sent
	}
	w.status, w.wroteHeader = code, true
}

func bodyAllowed(status int) bool {
	return status != http.StatusNoContent && status != http.StatusNotModified
}

func (w *h2Response) Write(p []byte) (int, error) {
	if w.detached {
		return 0, http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !bodyAllowed(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	if w.head {
		return len(p), nil
	}
	w.buf = append(w.buf, p...)
	if len(w.buf) >= h2MaxFrame {
		if err := w.send(false); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (w *h2Response) WriteString(s string) (int, error) {
	return w.Write([]byte(s))
}

// Flush sends the headers and whatever the body has so far.
func (w *h2Response) Flush() { w.FlushError() }

func (w *h2Response) FlushError() error {
	if w.detached {
		return http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return w.send(false)
}

// SetWriteDeadline bounds the writes of the response (for
// http.ResponseController).
func (w *h2Response) SetWriteDeadline(t time.Time) error {
	w.deadline = t
	return nil
}

// SetReadDeadline bounds the reads of the request body: a read waiting past
// t fails with os.ErrDeadlineExceeded.
func (w *h2Response) SetReadDeadline(t time.Time) error {
	st := w.st
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	st.readDL = t
	if st.bodyTimer != nil {
		st.bodyTimer.Stop()
		st.bodyTimer = nil
	}
	if !t.IsZero() {
		st.bodyTimer = time.AfterFunc(time.Until(t), func() {
			c.mu.Lock()
			c.cond.Broadcast()
			c.mu.Unlock()
		})
	}
	return nil
}

// send sends the headers if they have not gone, and the buffered body,
// ending the stream when end is set.
func (w *h2Response) send(end bool) error {
	c := w.st.c
	if !w.sentHeader {
		h := w.header
		if _, ok := h["Date"]; !ok {
			h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
		}
		if bodyAllowed(w.status) {
			if _, ok := h["Content-Type"]; !ok && len(w.buf) > 0 {
				h.Set("Content-Type", http.DetectContentType(w.buf))
			}
			if _, ok := h["Content-Length"]; !ok && end && !w.head {
				h.Set("Content-Length", strconv.Itoa(len(w.buf)))
			}
		}
		w.sentHeader = true
		if err := c.writeHeaders(w.st, w.status, h, end && len(w.buf) == 0); err != nil {
			return err
		}
		if end && len(w.buf) == 0 {
			return nil
		}
	}
	if len(w.buf) == 0 && !end {
		return nil
	}
	err := c.writeData(w.st, [][]byte{w.buf}, end, c.s.Opts.WriteTimeout, w.deadline, nil)
	w.buf = w.buf[:0]
	return err
}

// finish ends the response after the handler has returned.
func (w *h2Response) finish() {
	if w.detached {
		return
	}
	st, c := w.st, w.st.c
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if err := w.send(true); err != nil {
		c.endStream(st, err)
		return
	}
	c.mu.Lock()
	unread := !st.bodyEnd
	c.mu.Unlock()
	if unread {
		// The client may still be sending a body nobody reads.
		c.resetStream(st.id, http2.ErrCodeNo)
		return
	}
	c.endStream(st, errors.New("http2: response ended"))
}

// h2Body is a request's body, as its DATA frames bring it.
type h2Body struct{ st *h2Stream }

func (b *h2Body) Read(p []byte) (int, error) {
	st := b.st
	c := st.c
	c.mu.Lock()
	for len(st.body) == 0 && !st.bodyEnd && st.bodyErr == nil {
		if !st.readDL.IsZero() && !time.Now().Before(st.readDL) {
			c.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		c.cond.Wait()
	}
	if len(st.body) == 0 {
		err := st.bodyErr
		c.mu.Unlock()
		if err == nil {
			err = io.EOF
		}
		return 0, err
	}
	n := copy(p, st.body)
	st.body = st.body[n:]
	if len(st.body) == 0 {
		st.body = nil
	}
	st.recvUnack += n
	c.recvUnack += n
	c.mu.Unlock()
	return n, c.giveBack(st)
}

// Close drops the rest of the body: bytes still to come are discarded.
func (b *h2Body) Close() error {
	st := b.st
	c := st.c
	c.mu.Lock()
	if st.bodyErr == nil && !st.bodyEnd {
		st.bodyErr = errors.New("http2: request body closed")
	}
	c.recvUnack += len(st.body)
	st.body = nil
	c.mu.Unlock()
	return c.giveBack(nil)
}

// H2SSE is an SSE or NDJSON stream on an HTTP/2 stream served by H2,
// detached from its handler: like Raw on HTTP/1.1, it needs no goroutine
// while idle, and writes pack its frames into DATA frames with one write.
type H2SSE struct {
	st      *h2Stream
	ndj     bool
	opts    Options
	pieces  [][]byte
	scratch h2Scratch
}

// DetachSSE starts an SSE stream (NDJSON when ndjson is set) on r, a
// request H2 serves, and takes it from the handler, which may then return
// while the stream goes on. gone is called once when the client has reset
// the stream or the connection has closed. It fails with
// http.ErrNotSupported when w is not H2's.
func DetachSSE(w http.ResponseWriter, r *http.Request, opts Options, ndjson bool, gone func()) (*H2SSE, error) {
	rw := h2ResponseOf(w)
	if rw == nil || rw.sentHeader || rw.detached {
		return nil, http.ErrNotSupported
	}
	rw.detached = true
	st, c := rw.st, rw.st.c
	h := http.Header{"Content-Type": {ContentType(ndjson)}, "Cache-Control": {"no-cache"}, "X-Accel-Buffering": {"no"},
		"Date": {time.Now().UTC().Format(http.TimeFormat)}}
	if err := c.writeHeaders(st, http.StatusOK, h, false); err != nil {
		return nil, err
	}
	s := &H2SSE{st: st, ndj: ndjson, opts: opts}
	c.mu.Lock()
	if st.reset {
		c.mu.Unlock()
		return nil, errStreamReset
	}
	st.onGone = gone
	c.mu.Unlock()
	if !ndjson {
		if err := s.write([]byte("retry: 2000\n\n")); err != nil {
			s.Abort()
			return nil, err
		}
	}
	return s, nil
}

// CanDetach reports whether w is the ResponseWriter of a request H2
// serves, whose stream DetachSSE can take over.
func CanDetach(w http.ResponseWriter) bool { return h2ResponseOf(w) != nil }

// h2ResponseOf finds H2's ResponseWriter under w's wrappers.
func h2ResponseOf(w http.ResponseWriter) *h2Response {
	for {
		switch t := w.(type) {
		case *h2Response:
			return t
		case interface{ Unwrap() http.ResponseWriter }:
			w = t.Unwrap()
		default:
			return nil
		}
	}
}

func (s *H2SSE) Kind() string {
	if s.ndj {
		return "ndjson"
	}
	return "sse"
}

func (s *H2SSE) Proto() string { return "HTTP/2.0" }

func (s *H2SSE) Format() Format {
	if s.ndj {
		return FormatNDJSON
	}
	return FormatSSE
}

// WriteEvents packs the frames into DATA frames and writes them at once.
func (s *H2SSE) WriteEvents(frames [][]byte) error {
	s.pieces = append(s.pieces[:0], frames...)
	err := s.st.c.writeData(s.st, s.pieces, false, s.opts.WriteTimeout, time.Time{}, &s.scratch)
	clear(s.pieces)
	if cap(s.pieces) > 16 {
		s.pieces = nil
	}
	return err
}

func (s *H2SSE) WriteNotice(name string, payload []byte) error {
	return s.write(noticeBytes(s.ndj, name, payload))
}

func (s *H2SSE) Keepalive() error {
	if s.ndj {
		return s.write([]byte("\n"))
	}
	return s.write([]byte(": keepalive\n\n"))
}

func (s *H2SSE) write(b []byte) error {
	s.pieces = append(s.pieces[:0], b)
	err := s.st.c.writeData(s.st, s.pieces, false, s.opts.WriteTimeout, time.Time{}, &s.scratch)
	clear(s.pieces)
	return err
}

// Close ends the stream: END_STREAM, unless the client has gone.
func (s *H2SSE) Close(r Reason) error {
	c := s.st.c
	c.mu.Lock()
	s.st.onGone = nil
	reset := s.st.reset
	c.mu.Unlock()
	var err error
	if !reset && r != ReasonGone {
		err = c.writeData(s.st, nil, true, s.opts.WriteTimeout, time.Time{}, nil)
	}
	c.endStream(s.st, errors.New("http2: stream closed"))
	return err
}

// Abort resets the stream from any goroutine: a write waiting on it fails
// at once. Close is still called, last.
func (s *H2SSE) Abort() {
	c := s.st.c
	c.endStream(s.st, errStreamReset)
	// The frame waits behind a write under way; the stream is over now.
	go func() {
		var b [4]byte
		putUint32(b[:], uint32(http2.ErrCodeCancel))
		c.writeFrame(http2.FrameRSTStream, 0, s.st.id, b[:])
	}()
}
