package transport

import (
	"net"
	"net/http"
	"sync"
	"time"
)

// Raw is an SSE or NDJSON stream on an HTTP/1.1 connection taken over from
// net/http. The response is written by hand and its body runs until the
// connection closes (Connection: close, no chunking), which every SSE and
// line-reading client accepts. Like a WebSocket, the stream then lives on
// its own and net/http's connection goroutine, with its stack and its
// buffers, is gone. The client's close is heard through the Poller, or
// else a goroutine waiting in a read.
//
// On HTTP/2, where streams share their connection, H2SSE is its
// counterpart (SSE when net/http serves HTTP/2).
type Raw struct {
	conn  net.Conn
	out   net.Conn // conn, or the socket under it, to write to (writerOf)
	ndj   bool
	gone  func()
	dl    writeDeadline
	bufs  net.Buffers
	watch *Watch // nil: a goroutine waits in a read
	once  sync.Once
}

// HijackSSE takes over r's connection and starts an SSE stream on it (an
// NDJSON one when ndjson is set). gone is called once when the client has
// closed the connection. It fails with http.ErrNotSupported on HTTP/2.
func HijackSSE(w http.ResponseWriter, r *http.Request, opts Options, ndjson bool, gone func()) (*Raw, error) {
	if r.ProtoMajor != 1 {
		return nil, http.ErrNotSupported
	}
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, err
	}
	// The client has nothing more to send on this connection (a request
	// pipelined behind this one is not served), so net/http's read
	// buffer, and anything in it, is dropped with it.
	s := &Raw{conn: conn, out: writerOf(conn), ndj: ndjson, gone: gone,
		dl: writeDeadline{timeout: opts.WriteTimeout, set: conn.SetWriteDeadline}}
	first := "retry: 2000\n\n"
	if ndjson {
		first = ""
	}
	head := "HTTP/1.1 200 OK\r\nContent-Type: " + ContentType(ndjson) + "\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n" +
		"Connection: close\r\nDate: " + time.Now().UTC().Format(http.TimeFormat) + "\r\n\r\n" + first
	if err := s.write([]byte(head)); err != nil {
		conn.Close()
		return nil, err
	}
	// The client sends nothing on a stream, so the connection becoming
	// readable — EOF, reset, or stray bytes — is the end of it.
	watched, err := watchReads(opts, conn, &s.watch, s.end)
	if err != nil {
		s.end()
		return nil, err
	}
	if watched {
		return s, nil
	}
	go func() {
		var b [1]byte
		s.conn.Read(b[:])
		s.end()
	}()
	return s, nil
}

// Abort closes the connection under the stream, from any goroutine: a
// write under way fails at once. It is for a server that cannot wait for
// the write timeout; Close is still called, last.
func (s *Raw) Abort() { s.end() }

func (s *Raw) end() {
	s.once.Do(func() {
		if s.watch != nil {
			s.watch.Stop()
		}
		s.conn.Close()
		if s.gone != nil {
			s.gone()
		}
	})
}

func (s *Raw) Kind() string {
	if s.ndj {
		return "ndjson"
	}
	return "sse"
}

func (s *Raw) Proto() string { return "HTTP/1.1" }

func (s *Raw) Format() Format {
	if s.ndj {
		return FormatNDJSON
	}
	return FormatSSE
}

// WriteEvents writes every frame with one write (writeFrames).
func (s *Raw) WriteEvents(frames [][]byte) error {
	if err := s.dl.refresh(); err != nil {
		return err
	}
	return writeFrames(s.out, &s.bufs, frames)
}

func (s *Raw) WriteNotice(name string, payload []byte) error {
	return s.write(noticeBytes(s.ndj, name, payload))
}

func (s *Raw) Keepalive() error {
	if s.ndj {
		return s.write([]byte("\n"))
	}
	return s.write([]byte(": keepalive\n\n"))
}

// Close ends the response: the connection closes, which is the end of a
// close-delimited body.
func (s *Raw) Close(Reason) error {
	s.end()
	return nil
}

func (s *Raw) write(b []byte) error {
	if err := s.dl.refresh(); err != nil {
		return err
	}
	_, err := s.out.Write(b)
	return err
}
