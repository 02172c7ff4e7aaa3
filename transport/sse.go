package transport

import (
	"net/http"
)

// SSE is a text/event-stream (or NDJSON) response that stays in net/http:
// the transport for HTTP/2 when net/http's server serves it (--net-http2).
type SSE struct {
	w     http.ResponseWriter
	rc    *http.ResponseController
	proto string
	ndj   bool // NDJSON: same mechanics, another framing
	dl    writeDeadline
}

// NewSSE starts an event stream on w: headers, then `retry: 2000`, flushed
// so the client knows at once that it is connected.
func NewSSE(w http.ResponseWriter, r *http.Request, opts Options) (*SSE, error) {
	s := startResponse(w, r, opts, false)
	return s, s.write([]byte("retry: 2000\n\n"))
}

// NewNDJSON starts a newline-delimited JSON stream on w: one event object
// per line, for `curl -N ... | jq`.
func NewNDJSON(w http.ResponseWriter, r *http.Request, opts Options) (*SSE, error) {
	s := startResponse(w, r, opts, true)
	return s, s.rc.Flush()
}

func startResponse(w http.ResponseWriter, r *http.Request, opts Options, ndjson bool) *SSE {
	h := w.Header()
	h.Set("Content-Type", ContentType(ndjson))
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // proxies like nginx must not buffer
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	return &SSE{w: w, rc: rc, proto: r.Proto, ndj: ndjson,
		dl: writeDeadline{timeout: opts.WriteTimeout, set: rc.SetWriteDeadline}}
}

// ContentType is the media type of an SSE stream, or an NDJSON one.
func ContentType(ndjson bool) string {
	if ndjson {
		return "application/x-ndjson"
	}
	return "text/event-stream"
}

func (s *SSE) Kind() string {
	if s.ndj {
		return "ndjson"
	}
	return "sse"
}

func (s *SSE) Proto() string { return s.proto }

func (s *SSE) Format() Format {
	if s.ndj {
		return FormatNDJSON
	}
	return FormatSSE
}

// WriteEvents writes the frames into the response's buffer and flushes
// once, under a write deadline.
func (s *SSE) WriteEvents(frames [][]byte) error {
	if err := s.deadline(); err != nil {
		return err
	}
	for _, f := range frames {
		if _, err := s.w.Write(f); err != nil {
			return err
		}
	}
	return s.rc.Flush()
}

func (s *SSE) WriteNotice(name string, payload []byte) error {
	return s.write(noticeBytes(s.ndj, name, payload))
}

// noticeBytes frames a notice: an SSE named event, or for NDJSON a line
// {"notice":name, ...payload's fields}.
func noticeBytes(ndjson bool, name string, payload []byte) []byte {
	b := make([]byte, 0, len(payload)+len(name)+16)
	if ndjson {
		b = append(b, `{"notice":"`...)
		b = append(b, name...)
		b = append(b, '"')
		if len(payload) > 2 { // an object with fields: splice them in
			b = append(b, ',')
			b = append(b, payload[1:len(payload)-1]...)
		}
		return append(b, "}\n"...)
	}
	b = append(b, "event: "...)
	b = append(b, name...)
	b = append(b, "\ndata: "...)
	b = append(b, payload...)
	return append(b, "\n\n"...)
}

func (s *SSE) Keepalive() error {
	if s.ndj {
		return s.write([]byte("\n")) // jq and JSON-lines readers skip blank lines
	}
	return s.write([]byte(": keepalive\n\n"))
}

// Close ends nothing by itself: the response ends when the handler returns.
func (s *SSE) Close(Reason) error { return nil }

func (s *SSE) write(b []byte) error {
	if err := s.deadline(); err != nil {
		return err
	}
	if _, err := s.w.Write(b); err != nil {
		return err
	}
	return s.rc.Flush()
}

func (s *SSE) deadline() error {
	err := s.dl.refresh()
	if err == http.ErrNotSupported {
		return nil
	}
	return err
}
