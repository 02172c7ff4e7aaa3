package server

import (
	"strconv"
	"testing"

	"github.com/agentstream/agentstream/model"
)

// FuzzParseCursor: whatever a client sends as after_id, after or
// Last-Event-ID, the cursor parser either refuses it with a 400
// invalid_cursor or returns an id >= 0 that the input spells.
func FuzzParseCursor(f *testing.F) {
	for _, s := range []string{"", "0", "42", "-1", "abc", "99999999999999999999", "+7", " 1", "0x10", "1e3", "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		n, aerr := parseCursor(v, "after")
		if aerr != nil {
			if aerr.Status != 400 || aerr.Code != "invalid_cursor" {
				t.Fatalf("%q: refused with %d %s", v, aerr.Status, aerr.Code)
			}
			return
		}
		if n < 0 {
			t.Fatalf("%q: accepted as %d", v, n)
		}
		if v == "" {
			if n != 0 {
				t.Fatalf("empty cursor is %d", n)
			}
			return
		}
		if m, err := strconv.ParseInt(v, 10, 64); err != nil || m != n {
			t.Fatalf("%q: accepted as %d, which it does not spell", v, n)
		}
	})
}

// FuzzTicketID: only 32 lowercase hex digits pass as a ticket id, so
// nothing else ever reaches the database.
func FuzzTicketID(f *testing.F) {
	for _, s := range []string{"", "00112233445566778899aabbccddeeff", "00112233445566778899AABBCCDDEEFF", "\x00", "abc%00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		if !model.ValidTicketID(v) {
			return
		}
		if len(v) != 32 {
			t.Fatalf("%q accepted, %d bytes", v, len(v))
		}
		for _, c := range v {
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				t.Fatalf("%q accepted with %q", v, c)
			}
		}
	})
}

// FuzzCheckID: an id model.CheckID accepts is 1 to 128 bytes of the id
// alphabet, safe as a path segment unescaped.
func FuzzCheckID(f *testing.F) {
	for _, s := range []string{"", "coder-1", "has space", "a/b", "ü", "x@y.z"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		if model.CheckID("agent_id", v) != "" {
			return
		}
		if len(v) < 1 || len(v) > model.MaxIDLen {
			t.Fatalf("%q accepted", v)
		}
		for _, c := range []byte(v) {
			if c <= ' ' || c == '/' || c == '%' || c == '?' || c == '#' || c >= 0x7f {
				t.Fatalf("%q accepted with %q", v, c)
			}
		}
	})
}
