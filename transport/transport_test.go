package transport

import (
	"bytes"
	"net/http"
	"testing"

	"github.com/gobwas/ws"
)

func TestEncode(t *testing.T) {
	js := []byte(`{"id":7,"type":"x"}`)
	if got := string(Encode(FormatSSE, 7, js)); got != "id: 7\ndata: {\"id\":7,\"type\":\"x\"}\n\n" {
		t.Errorf("SSE frame %q", got)
	}
	if got := string(Encode(FormatNDJSON, 7, js)); got != "{\"id\":7,\"type\":\"x\"}\n" {
		t.Errorf("NDJSON line %q", got)
	}
	// The WebSocket frame must read back as one final, unmasked text frame
	// holding exactly the JSON — for a short and a 16-bit-length payload.
	for _, p := range [][]byte{js, bytes.Repeat([]byte("a"), 300), bytes.Repeat([]byte("b"), 70000)} {
		f, err := ws.ReadFrame(bytes.NewReader(Encode(FormatWS, 1, p)))
		if err != nil {
			t.Fatal(err)
		}
		if !f.Header.Fin || f.Header.Masked || f.Header.OpCode != ws.OpText || !bytes.Equal(f.Payload, p) {
			t.Fatalf("WS frame of %d bytes: header %+v, payload %d bytes", len(p), f.Header, len(f.Payload))
		}
	}
}

func TestNegotiate(t *testing.T) {
	cases := []struct {
		hdr  http.Header
		want string
	}{
		{http.Header{}, "sse"},
		{http.Header{"Accept": {"text/event-stream"}}, "sse"},
		{http.Header{"Accept": {"application/x-ndjson"}}, "ndjson"},
		{http.Header{"Accept": {"text/html, application/x-ndjson;q=0.9"}}, "ndjson"},
		{http.Header{"Upgrade": {"WebSocket"}, "Accept": {"application/x-ndjson"}}, "ws"},
	}
	for _, c := range cases {
		if got := Negotiate(&http.Request{Header: c.hdr}); got != c.want {
			t.Errorf("%v: %s, want %s", c.hdr, got, c.want)
		}
	}
}
