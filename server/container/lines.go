package container

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"unicode/utf8"

	"github.com/agentstream/agentstream/model"
)

// MaxLine is the longest output line kept whole; the rest of a longer line
// is dropped and the event says so.
const MaxLine = 1 << 20

// TypeOutputLine is the type of an event made from a line that is not an
// event of its own.
const TypeOutputLine = "output.line"

// Line is the event one line of an agent's output becomes.
type Line struct {
	Type string
	Data json.RawMessage
}

// outputLine is the data of an output.line event.
type outputLine struct {
	Stream    string `json:"stream"`
	Line      string `json:"line"`
	Truncated bool   `json:"truncated,omitempty"`
	Bytes     int    `json:"bytes,omitempty"` // the whole line's length, when truncated
}

// ParseLine applies the line rules to one line of stream ("stdout" or
// "stderr"), without its line ending. size is the line's length before it
// was cut to MaxLine, or 0 when it was not.
//
// A line that is a JSON object with a valid string "type" is an event as
// written: {"type":T,"data":D} is type T with data D; an object with other
// keys besides is type T with the whole object as its data, so nothing the
// agent wrote is dropped. Any other line — plain text, JSON that is not such
// an object, a type outside [a-z0-9._-], a cut line — is an output.line
// event {"stream","line"}, marked "truncated" with the line's full size
// when it was cut.
func ParseLine(stream string, line []byte, size int) Line {
	if size == 0 {
		if ev, ok := parseEvent(line); ok {
			return ev
		}
	}
	out := outputLine{Stream: stream, Line: string(line)}
	if size > 0 {
		out.Truncated, out.Bytes = true, size
	}
	data, _ := json.Marshal(out) // a struct of strings always encodes
	return Line{Type: TypeOutputLine, Data: data}
}

func parseEvent(line []byte) (Line, bool) {
	line = bytes.TrimSpace(line)
	if len(line) < 2 || line[0] != '{' || !json.Valid(line) {
		return Line{}, false
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal(line, &obj) != nil {
		return Line{}, false
	}
	var typ string
	if json.Unmarshal(obj["type"], &typ) != nil || model.CheckType(typ) != "" {
		return Line{}, false
	}
	var buf bytes.Buffer
	data, hasData := obj["data"]
	switch {
	case len(obj) == 1:
		data = json.RawMessage("{}")
	case len(obj) == 2 && hasData:
	default:
		data = line
	}
	json.Compact(&buf, data) // valid: it came out of a valid document
	return Line{Type: typ, Data: buf.Bytes()}, true
}

// ScanLines reads r to its end, one line at a time, and calls fn with each
// line's event by the rules of ParseLine, until fn returns false. A line longer than limit (MaxLine
// when limit <= 0) is cut on a UTF-8 boundary at or before limit bytes, and the
// rest of it is read past without being kept. A last line without a newline
// counts.
func ScanLines(r io.Reader, stream string, limit int, fn func(Line) bool) error {
	if limit <= 0 {
		limit = MaxLine
	}
	br := bufio.NewReaderSize(r, 64<<10)
	var head []byte // the line's first limit+1 bytes: one past limit shows where a rune starts
	size := 0       // the line's length so far
	for {
		chunk, err := br.ReadSlice('\n')
		size += len(chunk)
		if room := limit + 1 - len(head); room > 0 {
			head = append(head, chunk[:min(len(chunk), room)]...)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if size > 0 {
			line, n := head, size
			if bytes.HasSuffix(chunk, []byte("\n")) {
				n--
				if bytes.HasSuffix(chunk, []byte("\r\n")) {
					n--
				}
				if size <= len(head) {
					line = line[:n]
				}
			}
			var goOn bool
			if n <= limit {
				goOn = fn(ParseLine(stream, line[:n], 0))
			} else {
				goOn = fn(ParseLine(stream, cutUTF8(line, limit), n))
			}
			if !goOn {
				return nil
			}
			head, size = head[:0], 0
			if cap(head) > 64<<10 {
				head = nil // one long line need not cost its size for good
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// cutUTF8 returns the longest prefix of b of at most n bytes that does not
// end inside a UTF-8 sequence (b's first n bytes if b is not UTF-8 there).
func cutUTF8(b []byte, n int) []byte {
	if len(b) <= n {
		return b
	}
	for cut := n; cut > 0 && cut > n-utf8.UTFMax; cut-- {
		if utf8.RuneStart(b[cut]) {
			return b[:cut]
		}
	}
	return b[:n]
}

// Fit returns l with its data cut to at most limit bytes (limit is at least
// 256), for writers with a smaller bound on data than MaxLine, such as the
// store's 64 KiB. An output.line keeps its shape with a shorter line, marked
// truncated with the line's full size; any other event keeps its type, and
// its data becomes {"truncated":true,"bytes":N,"head":"<its first bytes,
// as text>"}, so that what was cut is visible rather than lost silently.
func Fit(l Line, limit int) Line {
	if len(l.Data) <= limit {
		return l
	}
	var out outputLine
	if l.Type == TypeOutputLine && json.Unmarshal(l.Data, &out) == nil {
		if out.Bytes == 0 {
			out.Bytes = len(out.Line)
		}
		text := []byte(out.Line)
		out.Truncated = true
		return Line{Type: l.Type, Data: shrink(text, limit, func(cut []byte) any {
			out.Line = string(cut)
			return out
		})}
	}
	return Line{Type: l.Type, Data: shrink(l.Data, limit, func(cut []byte) any {
		return struct {
			Truncated bool   `json:"truncated"`
			Bytes     int    `json:"bytes"`
			Head      string `json:"head"`
		}{true, len(l.Data), string(cut)}
	})}
}

// shrink encodes wrap(a prefix of text), as long a prefix as fits in limit
// bytes once encoded (escaping makes that length hard to know up front).
func shrink(text []byte, limit int, wrap func([]byte) any) json.RawMessage {
	n := limit - 128
	for {
		enc, _ := json.Marshal(wrap(cutUTF8(text, n)))
		if len(enc) <= limit || n == 0 {
			return enc
		}
		n = max(0, n*limit/len(enc)-64)
	}
}
