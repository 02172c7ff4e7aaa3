package container

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestParseLine(t *testing.T) {
	for _, tc := range []struct{ line, typ, data string }{
		{`{"type":"step","data":{"n":1}}`, "step", `{"n":1}`},
		{`  {"type": "step", "data": [1, 2]}  `, "step", `[1,2]`},
		{`{"type":"step"}`, "step", `{}`},
		{`{"type":"assistant","message":{"text":"hi"}}`, "assistant", `{"type":"assistant","message":{"text":"hi"}}`},
		{`{"type":"Step"}`, "output.line", `{"stream":"stdout","line":"{\"type\":\"Step\"}"}`},
		{`{"type":1}`, "output.line", `{"stream":"stdout","line":"{\"type\":1}"}`},
		{`{"data":{}}`, "output.line", `{"stream":"stdout","line":"{\"data\":{}}"}`},
		{`{"type":"step"} trailing`, "output.line", `{"stream":"stdout","line":"{\"type\":\"step\"} trailing"}`},
		{`[{"type":"step"}]`, "output.line", `{"stream":"stdout","line":"[{\"type\":\"step\"}]"}`},
		{`hello <b>`, "output.line", `{"stream":"stdout","line":"hello \u003cb\u003e"}`},
		{``, "output.line", `{"stream":"stdout","line":""}`},
	} {
		got := ParseLine("stdout", []byte(tc.line), 0)
		if got.Type != tc.typ || string(got.Data) != tc.data {
			t.Errorf("ParseLine(%q) = %s %s, want %s %s", tc.line, got.Type, got.Data, tc.typ, tc.data)
		}
	}
	// A cut line is never an event, even if its start looks like one.
	got := ParseLine("stderr", []byte(`{"type":"step"}`), 5000)
	if got.Type != TypeOutputLine || string(got.Data) != `{"stream":"stderr","line":"{\"type\":\"step\"}","truncated":true,"bytes":5000}` {
		t.Errorf("cut line: %s %s", got.Type, got.Data)
	}
}

func TestScanLines(t *testing.T) {
	long := strings.Repeat("é", 100) // 200 bytes, every rune 2 bytes
	in := "one\r\n" + long + "\n\n" + `{"type":"x"}` + "\nlast"
	var got []Line
	if err := ScanLines(strings.NewReader(in), "stdout", 101, func(l Line) bool { got = append(got, l); return true }); err != nil {
		t.Fatal(err)
	}
	var lines []outputLine
	for _, l := range got {
		var o outputLine
		json.Unmarshal(l.Data, &o)
		lines = append(lines, o)
	}
	if len(got) != 5 || lines[0].Line != "one" || lines[2].Line != "" || got[3].Type != "x" || lines[4].Line != "last" {
		t.Fatalf("lines %+v", got)
	}
	// Cut at 101 bytes falls inside a rune: it is cut before it.
	if !lines[1].Truncated || lines[1].Bytes != 200 || lines[1].Line != strings.Repeat("é", 50) {
		t.Fatalf("long line %+v", lines[1])
	}
}

func TestScanLinesLongerThanBuffer(t *testing.T) {
	// Past bufio's 64 KiB buffer, with a \r\n ending, under and over max.
	fits := strings.Repeat("a", 200<<10)
	over := strings.Repeat("b", 300<<10)
	in := fits + "\r\n" + over + "\r\nend\n"
	var got []outputLine
	err := ScanLines(strings.NewReader(in), "stdout", 256<<10, func(l Line) bool {
		var o outputLine
		json.Unmarshal(l.Data, &o)
		got = append(got, o)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[0].Line != fits || got[0].Truncated {
		t.Fatalf("%d lines; first %d bytes truncated %v", len(got), len(got[0].Line), got[0].Truncated)
	}
	if !got[1].Truncated || got[1].Bytes != len(over) || got[1].Line != over[:256<<10] || got[2].Line != "end" {
		t.Fatalf("second: truncated %v bytes %d kept %d; third %q", got[1].Truncated, got[1].Bytes, len(got[1].Line), got[2].Line)
	}
}

func TestFit(t *testing.T) {
	// Control characters take six bytes each once escaped.
	line := ParseLine("stdout", bytes.Repeat([]byte{1}, 100<<10), 0)
	fit := Fit(line, 64<<10)
	var o outputLine
	if err := json.Unmarshal(fit.Data, &o); err != nil || len(fit.Data) > 64<<10 || !o.Truncated || o.Bytes != 100<<10 || len(o.Line) < 10000 {
		t.Fatalf("fit output line: %d bytes, %+v (kept %d), %v", len(fit.Data), o.Truncated, len(o.Line), err)
	}
	big := Line{Type: "tool.result", Data: json.RawMessage(`{"text":"` + strings.Repeat("z", 70<<10) + `"}`)}
	fit = Fit(big, 64<<10)
	var m struct {
		Truncated bool
		Bytes     int
		Head      string
	}
	if err := json.Unmarshal(fit.Data, &m); err != nil || fit.Type != "tool.result" || len(fit.Data) > 64<<10 || !m.Truncated || m.Bytes != len(big.Data) || !strings.HasPrefix(string(big.Data), m.Head) {
		t.Fatalf("fit event: %s, %d bytes, %v", fit.Type, len(fit.Data), err)
	}
	small := Line{Type: "x", Data: json.RawMessage(`{}`)}
	if got := Fit(small, 64<<10); string(got.Data) != "{}" {
		t.Fatalf("a small event changed: %s", got.Data)
	}
}

// FuzzScanLines: whatever a process writes, every line becomes one event
// with a valid type and valid JSON data, and cut text stays valid UTF-8
// where the input was.
func FuzzScanLines(f *testing.F) {
	f.Add([]byte("plain\n{\"type\":\"x\",\"data\":1}\n"), 16)
	f.Add([]byte("éééé\r\n\n{\"type\":\"x\"}"), 3)
	f.Add([]byte{0xff, 0xfe, '\n', '{'}, 1)
	f.Fuzz(func(t *testing.T, in []byte, limit int) {
		if limit < 1 || limit > 1<<16 {
			return
		}
		n := 0
		err := ScanLines(bytes.NewReader(in), "stdout", limit, func(l Line) bool {
			n++
			if l.Type == "" || !json.Valid(l.Data) {
				t.Fatalf("bad event %q %q", l.Type, l.Data)
			}
			if l.Type == TypeOutputLine {
				var o outputLine
				if err := json.Unmarshal(l.Data, &o); err != nil {
					t.Fatal(err)
				}
				if o.Truncated && utf8.Valid(in) && !utf8.ValidString(o.Line) {
					t.Fatalf("cut inside a rune: %q", o.Line)
				}
			}
			return true
		})
		if err != nil {
			t.Fatal(err)
		}
		want := bytes.Count(in, []byte("\n"))
		if len(in) > 0 && in[len(in)-1] != '\n' {
			want++
		}
		if n != want {
			t.Fatalf("%d events for %d lines", n, want)
		}
	})
}
