package server

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/golang-jwt/jwt/v5"

	"github.com/agentstream/agentstream/model"
)

// TestClientMistakesAre4xx: a malformed ticket is a 401, not a store
// failure: no 503, no ERROR line, no store_errors_total.
func TestClientMistakesAre4xx(t *testing.T) {
	var logs bytes.Buffer
	e := newEnvWith(t, Options{Log: slog.New(slog.NewTextHandler(&logs, nil))}, model.Options{})
	const stream = "/api/towns/t1/container/agents/a1/stream?ticket="
	for _, tk := range []string{"%00", "abc%00def", strings.Repeat("z", 32), "00112233445566778899AABBCCDDEEFF", strings.Repeat("0", 5000)} {
		if status, code := e.get(stream+tk, nil); status != 401 || code != "invalid_ticket" {
			t.Fatalf("ticket %.20q: %d %q, want 401 invalid_ticket", tk, status, code)
		}
	}
	if n := e.metric(`agentstream_store_errors_total{op="redeem"}`); n != 0 {
		t.Fatalf("store_errors_total{op=redeem} = %v", n)
	}
	if strings.Contains(logs.String(), "level=ERROR") {
		t.Fatalf("client mistakes logged as errors:\n%s", logs.String())
	}
}

// TestCancelledRequestIsNotAStoreError: a request its client cancelled
// while the store was answering is not counted or logged as a store
// failure.
func TestCancelledRequestIsNotAStoreError(t *testing.T) {
	var logs bytes.Buffer
	e := newEnvWith(t, Options{Log: slog.New(slog.NewTextHandler(&logs, nil))}, model.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req := httptest.NewRequestWithContext(ctx, "GET", "/api/rigs/r1/agents/a1/events", nil)
	req.Header.Set("Authorization", "Bearer "+e.viewer)
	e.api.ServeHTTP(httptest.NewRecorder(), req)
	if n := e.metric(`agentstream_store_errors_total{op="after"}`); n != 0 {
		t.Fatalf("a cancelled read counted as a store error: %v", n)
	}
	if strings.Contains(logs.String(), "level=ERROR") {
		t.Fatalf("a cancelled read logged as an error:\n%s", logs.String())
	}
}

// TestTicketUsedOnlyByAnOpenedStream: a bad cursor, a refused Origin and a
// HEAD request are refused or answered without using up the ticket.
func TestTicketUsedOnlyByAnOpenedStream(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(2))
	path := e.ticket("a1")
	wsHdr := map[string]string{"Upgrade": "websocket", "Connection": "Upgrade",
		"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
	with := func(extra map[string]string, more ...string) map[string]string {
		h := map[string]string{}
		for k, v := range extra {
			h[k] = v
		}
		for i := 0; i+1 < len(more); i += 2 {
			h[more[i]] = more[i+1]
		}
		return h
	}
	if status, code := e.get(path, map[string]string{"Last-Event-ID": "abc"}); status != 400 || code != "invalid_cursor" {
		t.Fatalf("bad cursor: %d %q", status, code)
	}
	if status, code := e.get(path, with(wsHdr, "Origin", "https://evil.example")); status != 403 || code != "origin_not_allowed" {
		t.Fatalf("refused origin: %d %q", status, code)
	}
	req, _ := http.NewRequest("HEAD", e.base+path, nil)
	resp, err := e.client.Do(req)
	if err != nil || resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("HEAD: %v %v", resp, err)
	}
	resp.Body.Close()
	c, code := e.openPath("sse-h1", path, 0, nil)
	if c == nil {
		t.Fatalf("the ticket was used up by requests that opened no stream: %d", code)
	}
	defer c.Close()
	readN(t, c, 2)
}

// TestWSCloseCodes: the server answers a client's close frame as RFC 6455
// says: no status with no status (never 1005 on the wire), a valid code
// echoed, a one-byte payload or a reserved, unassigned or out-of-range
// code with 1002, a reason that is not UTF-8 with 1007.
func TestWSCloseCodes(t *testing.T) {
	e := newEnv(t)
	cases := []struct {
		name    string
		payload []byte
		want    ws.StatusCode // 0: a close with an empty payload
	}{
		{"no status", nil, 0},
		{"one byte", []byte{0x03}, ws.StatusProtocolError},
		{"1000", ws.NewCloseFrameBody(1000, "bye"), 1000},
		{"3000 (registered range)", ws.NewCloseFrameBody(3000, ""), 3000},
		{"4999 (private range)", ws.NewCloseFrameBody(4999, ""), 4999},
		{"1005 sent on the wire", ws.NewCloseFrameBody(1005, ""), ws.StatusProtocolError},
		{"1006 sent on the wire", ws.NewCloseFrameBody(1006, ""), ws.StatusProtocolError},
		{"1004 reserved", ws.NewCloseFrameBody(1004, ""), ws.StatusProtocolError},
		{"999", ws.NewCloseFrameBody(999, ""), ws.StatusProtocolError},
		{"2000 unassigned", ws.NewCloseFrameBody(2000, ""), ws.StatusProtocolError},
		{"5000", ws.NewCloseFrameBody(5000, ""), ws.StatusProtocolError},
		{"reason not UTF-8", append(ws.NewCloseFrameBody(1000, ""), 0xff, 0xfe), ws.StatusInvalidFramePayloadData},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, r := e.rawWS()
			defer c.Close()
			if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewCloseFrame(tc.payload))); err != nil {
				t.Fatal(err)
			}
			for {
				f, err := ws.ReadFrame(r)
				if err != nil {
					t.Fatalf("reading the server's close: %v", err)
				}
				if f.Header.OpCode != ws.OpClose {
					continue
				}
				if tc.want == 0 {
					if len(f.Payload) != 0 {
						t.Fatalf("answered a close with no status by payload %x; want none", f.Payload)
					}
					return
				}
				if code, _ := ws.ParseCloseFrameData(f.Payload); code != tc.want {
					t.Fatalf("close code %d, want %d", code, tc.want)
				}
				return
			}
		})
	}
}

// TestOriginSchemeAndHost: a WebSocket's Origin must match the server's
// own origin in scheme and host (default ports aside), or an --origin.
func TestOriginSchemeAndHost(t *testing.T) {
	e := newEnvWith(t, Options{Origins: []string{"https://dash.example:443"}}, model.Options{})
	host := strings.TrimPrefix(e.base, "http://")
	for _, tc := range []struct {
		origin string
		ok     bool
	}{
		{e.base, true},
		{"HTTP://" + strings.ToUpper(host), true},
		{"https://" + host, false}, // this server speaks http here
		{"http://evil.example", false},
		{"null", false},
		{e.base + "/path", false},
		{"https://dash.example", true},
		{"https://DASH.example:443/", true},
		{"http://dash.example", false},
		{"https://dash.example:8443", false},
	} {
		c, code := e.openPath("ws", e.ticket("a1"), 0, http.Header{"Origin": {tc.origin}})
		if (c != nil) != tc.ok {
			t.Fatalf("Origin %q: status %d, want allowed=%v", tc.origin, code, tc.ok)
		}
		if c != nil {
			c.Close()
		}
	}
}

// TestTokenIssuedInTheFuture: a token whose iat is more than a minute
// ahead is refused; a few seconds of clock skew are not.
func TestTokenIssuedInTheFuture(t *testing.T) {
	e := newEnv(t)
	mint := func(iat time.Time) string {
		tok, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, Claims{Scope: ScopeViewer, Town: "t1",
			RegisteredClaims: jwt.RegisteredClaims{IssuedAt: jwt.NewNumericDate(iat), ExpiresAt: jwt.NewNumericDate(iat.Add(time.Hour))}}).SignedString(e.auth.key)
		return tok
	}
	if code, _, v := e.do("GET", "/api/towns/t1/agents", mint(time.Now().Add(2*time.Minute)), "", nil); code != 401 || errCode(v) != "invalid_token" {
		t.Fatalf("iat 2 min ahead: %d %v", code, v)
	}
	if code, _, v := e.do("GET", "/api/towns/t1/agents", mint(time.Now().Add(10*time.Second)), "", nil); code != 200 {
		t.Fatalf("iat 10 s ahead: %d %v", code, v)
	}
}
