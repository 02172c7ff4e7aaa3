// Package transport is the wire side of agentstream's event streams: one
// Stream interface that the stream handler writes to, and its SSE,
// WebSocket (gobwas/ws) and NDJSON implementations, over HTTP/1.1
// connections taken from net/http and over HTTP/2 streams of H2,
// agentstream's own HTTP/2 server side.
//
// It knows bytes and cursors, not events or SQL: the handler hands it
// frames made by Encode, computed once per event and format and shared by
// every client, and a Stream writes them in as few system calls as it can.
package transport

import (
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gobwas/ws"
)

// Format is a wire encoding of one event.
type Format uint8

// The formats. FormatJSON is the event's JSON object, the base the others
// are built from.
const (
	FormatJSON Format = iota
	FormatSSE
	FormatWS
	FormatNDJSON
)

// Encode returns the frame for one event in format f, given the event's id
// and its JSON object (which must not contain a raw newline: compact JSON
// never does).
func Encode(f Format, id int64, eventJSON []byte) []byte {
	switch f {
	case FormatSSE:
		b := make([]byte, 0, len(eventJSON)+32)
		b = append(b, "id: "...)
		b = strconv.AppendInt(b, id, 10)
		b = append(b, "\ndata: "...)
		b = append(b, eventJSON...)
		return append(b, "\n\n"...)
	case FormatWS:
		// A server's frames are not masked, so the whole frame — header
		// and payload — is the same for every client.
		h := ws.Header{Fin: true, OpCode: ws.OpText, Length: int64(len(eventJSON))}
		b := make([]byte, ws.HeaderSize(h), ws.HeaderSize(h)+len(eventJSON))
		writeHeader(b, h)
		return append(b, eventJSON...)
	case FormatNDJSON:
		b := make([]byte, 0, len(eventJSON)+1)
		b = append(b, eventJSON...)
		return append(b, '\n')
	}
	return eventJSON
}

// Reason is why the server ends a stream.
type Reason int

// The reasons, with their WebSocket close codes.
const (
	ReasonEnded    Reason = iota // the agent exited: 1000
	ReasonShutdown               // the server is going away: 1001
	ReasonPolicy                 // the client broke the rules: 1008
	ReasonError                  // the server failed: 1011
	ReasonGone                   // the client left: 1000, if it still listens
)

func (r Reason) String() string {
	return [...]string{"agent exited", "server shutting down", "policy violation", "server error", "client gone"}[r]
}

// Stream is one client's event stream. Its methods are called from one
// goroutine, the stream handler's.
type Stream interface {
	// Kind is "sse", "ws" or "ndjson"; Proto is the HTTP protocol
	// ("HTTP/1.1", "HTTP/2.0").
	Kind() string
	Proto() string
	// Format is the encoding WriteEvents expects.
	Format() Format
	// WriteEvents writes frames made by Encode for Format, in order, with
	// as few writes as it can, and flushes them to the client.
	WriteEvents(frames [][]byte) error
	// WriteNotice writes a named notice whose payload is a JSON object.
	WriteNotice(name string, payload []byte) error
	// Keepalive writes something the client does not show as an event.
	Keepalive() error
	// Close ends the stream; it is called once, last.
	Close(reason Reason) error
}

// Options are the settings every transport shares.
type Options struct {
	// WriteTimeout is how long a write may wait for a client that accepts
	// no bytes before the stream is dropped.
	WriteTimeout time.Duration
	// Keepalive is the interval of keepalives (SSE comment, WS ping); a
	// WebSocket client that sends nothing, not even a pong, for three
	// intervals is dropped.
	Keepalive time.Duration
	// Poller, when set, watches idle connections for client bytes in place
	// of a reading goroutine per connection (see Poller).
	Poller *Poller
}

// errStopped is Watch.Arm's error after Stop: whoever stopped the watch
// has taken over reading the connection.
var errStopped = errors.New("transport: read watch stopped")

// reuse readies a write's buffer list for the next write: emptied of its
// frames (shared bytes that must not be kept alive), and dropped when a
// large batch grew it, so that an idle stream does not hold it.
func reuse(bufs net.Buffers) net.Buffers {
	if cap(bufs) > 16 {
		return nil
	}
	clear(bufs[:cap(bufs)])
	return bufs[:0]
}

// watchReads has opts.Poller call onReadable when conn has bytes to read,
// storing the armed watch in *w (before arming, so that onReadable finds
// it). It reports false when there is no Poller or conn cannot be watched:
// the caller then reads conn on a goroutine of its own.
func watchReads(opts Options, conn net.Conn, w **Watch, onReadable func()) (bool, error) {
	if opts.Poller == nil {
		return false, nil
	}
	watch, err := opts.Poller.Watch(conn, onReadable)
	if err != nil {
		return false, nil
	}
	*w = watch
	return true, watch.Arm()
}

// Kind of transport a request asks for: "ws" for a WebSocket upgrade,
// "ndjson" for Accept: application/x-ndjson, else "sse".
func Negotiate(r *http.Request) string {
	if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		return "ws"
	}
	for _, a := range r.Header.Values("Accept") {
		for _, part := range strings.Split(a, ",") {
			mt, _, _ := strings.Cut(strings.TrimSpace(part), ";")
			if strings.EqualFold(strings.TrimSpace(mt), "application/x-ndjson") {
				return "ndjson"
			}
		}
	}
	return "sse"
}

// writeHeader puts a WebSocket frame header into b, which must be exactly
// ws.HeaderSize(h) long.
func writeHeader(b []byte, h ws.Header) {
	w := fixedWriter{b: b[:0]}
	_ = ws.WriteHeader(&w, h) // cannot fail: the buffer has room
}

type fixedWriter struct{ b []byte }

func (w *fixedWriter) Write(p []byte) (int, error) {
	w.b = append(w.b, p...)
	return len(p), nil
}

// writeDeadline keeps a connection's write deadline at most WriteTimeout and
// at least three quarters of it ahead. Moving a deadline costs a timer
// update in the runtime's poller; doing it only when a quarter of the time
// has passed, rather than before every write, saves that on nearly every
// write of a busy stream. A client that accepts nothing is so dropped
// after between 3/4 and all of WriteTimeout.
//
// It reads only the monotonic clock, as an offset from the first refresh:
// time.Now reads the wall clock too, a second clock read per write.
type writeDeadline struct {
	timeout time.Duration
	epoch   time.Time     // the first refresh's time.Now
	at      time.Duration // the deadline, after epoch
	set     func(time.Time) error
}

func (d *writeDeadline) refresh() error {
	if d.timeout <= 0 {
		return nil
	}
	if d.epoch.IsZero() {
		d.epoch = time.Now()
	}
	now := time.Since(d.epoch)
	if d.at-now > d.timeout*3/4 {
		return nil
	}
	d.at = now + d.timeout
	return d.set(d.epoch.Add(d.at))
}

// writeFrames writes frames to w with one system call: a write for a
// single frame, the common case, and a writev for more (net.Buffers costs
// an iovec array, and the kernel its import, even for one). bufs is the
// caller's list for the writev, kept for the next call.
func writeFrames(w io.Writer, bufs *net.Buffers, frames [][]byte) error {
	if len(frames) == 1 {
		_, err := w.Write(frames[0])
		return err
	}
	*bufs = append((*bufs)[:0], frames...)
	b := *bufs // WriteTo consumes its receiver
	_, err := b.WriteTo(w)
	*bufs = reuse(*bufs)
	return err
}
