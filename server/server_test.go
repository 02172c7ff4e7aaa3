package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/transport"
)

// testEnv is a real server on 127.0.0.1 — the http.Server agentstream runs,
// HTTP/1.1 and h2c on one port — over a real SQLite file.
type testEnv struct {
	t      testing.TB
	store  *model.Store
	sched  *poll.Scheduler
	auth   *Auth
	api    *Server
	base   string // http://127.0.0.1:port
	client *http.Client
	agent  string // token of agent a1, rig r1, town t1
	viewer string // viewer of town t1
	stop   func() // shuts the server down, as at the test's end; once
}

func newEnv(t testing.TB) *testEnv { return newEnvWith(t, Options{}, model.Options{}) }

// newEnvWith is newEnv with options. Streams' clients are heard through a
// transport.Poller where the system has one; newEnvNoPoller leaves it out.
func newEnvWith(t testing.TB, opts Options, sopts model.Options) *testEnv {
	t.Helper()
	if opts.Poller == nil {
		if p, err := transport.NewPoller(); err == nil {
			opts.Poller = p
			t.Cleanup(func() { p.Close() })
		}
	}
	return newEnvNoPoller(t, opts, sopts)
}

// newEnvNoPoller is newEnvWith where each stream reads its client on a
// goroutine of its own (the fallback on systems without epoll, and on TLS).
func newEnvNoPoller(t testing.TB, opts Options, sopts model.Options) *testEnv {
	t.Helper()
	return newEnvOn(t, current.DSN(t), opts, sopts, poll.Options{})
}

// newEnvOn is a server on the database dsn (a SQLite path, or a
// PostgreSQL URL that other envs may share, as instances do), listening
// for other instances' commits as serve does. Every env signs with the
// same secret, so any env's tokens and tickets work on every other.
func newEnvOn(t testing.TB, dsn string, opts Options, sopts model.Options, popts poll.Options) *testEnv {
	t.Helper()
	store, err := model.Open(context.Background(), dsn, sopts)
	if err != nil {
		t.Fatal(err)
	}
	auth, err := NewAuth([]byte(strings.Repeat("k", 32)))
	if err != nil {
		t.Fatal(err)
	}
	if popts.MinRetained == 0 {
		popts.MinRetained = store.Retain() // as serve sets it
	}
	sched := poll.New(store, popts)
	lctx, stopListen := context.WithCancel(context.Background())
	listening := make(chan struct{})
	go func() {
		defer close(listening)
		store.Listen(lctx, sched.NotifyKeys)
	}()
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	api := New(store, sched, auth, opts)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := newHTTPServer(api, opts.Log, 0, 0)
	// As Serve does: a cleartext HTTP/2 connection is detached from
	// net/http only through the LimitListener's connections.
	go hs.Serve(transport.NewLimitListener(ln, 1<<20, connRefusal))
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	stop := sync.OnceFunc(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		api.Drain(ctx)
		hs.Close()
		tr.CloseIdleConnections()
		stopListen()
		<-listening
		sched.Close()
		store.Close()
	})
	t.Cleanup(stop)
	e := &testEnv{t: t, store: store, sched: sched, auth: auth, api: api, stop: stop,
		base: "http://" + ln.Addr().String(), client: &http.Client{Transport: tr}}
	e.agent = e.mustMintAgent("t1", "r1", "a1")
	e.viewer, err = auth.MintViewer("t1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *testEnv) mustMintAgent(town, rig, agent string) string {
	tok, err := e.auth.MintAgent(town, rig, agent, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

// do sends a request and returns the status, headers and decoded JSON body.
func (e *testEnv) do(method, path, token, contentType string, body []byte) (int, http.Header, map[string]any) {
	e.t.Helper()
	req, err := http.NewRequest(method, e.base+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var v map[string]any
	if len(raw) > 0 && strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(raw, &v); err != nil {
			e.t.Fatalf("%s %s: body is not JSON: %q", method, path, raw)
		}
	}
	return resp.StatusCode, resp.Header, v
}

func (e *testEnv) post(token string, body string) (int, map[string]any) {
	e.t.Helper()
	code, _, v := e.do("POST", "/api/rigs/r1/agent-events", token, "application/json", []byte(body))
	return code, v
}

// snapshot is what "nothing changed" compares: every row of agent_events.
func (e *testEnv) snapshot() string {
	e.t.Helper()
	var evs []model.Event
	if err := e.store.DB().NewSelect().Model(&evs).OrderExpr("id").Scan(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	b, _ := json.Marshal(evs)
	return string(b)
}

func errCode(v map[string]any) string {
	e, _ := v["error"].(map[string]any)
	code, _ := e["code"].(string)
	if msg, _ := e["message"].(string); msg == "" {
		return "<no message>"
	}
	return code
}

func TestBadInputChangesNothing(t *testing.T) {
	e := newEnv(t)
	if code, _ := e.post(e.agent, `{"type":"seed.event"}`); code != 201 {
		t.Fatalf("seed post: %d", code)
	}
	key := e.auth.key
	expired, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, Claims{Scope: ScopeAgent, Town: "t1", Rig: "r1",
		RegisteredClaims: jwt.RegisteredClaims{Subject: "a1", ExpiresAt: jwt.NewNumericDate(time.Now().Add(-time.Minute))}}).SignedString(key)
	noExp, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, Claims{Scope: ScopeAgent, Town: "t1", Rig: "r1",
		RegisteredClaims: jwt.RegisteredClaims{Subject: "a1"}}).SignedString(key)
	other, _ := NewAuth([]byte(strings.Repeat("x", 32)))
	wrongSecret, _ := other.MintAgent("t1", "r1", "a1", time.Hour)
	b64 := base64.RawURLEncoding.EncodeToString
	algNone := b64([]byte(`{"alg":"none","typ":"JWT"}`)) + "." +
		b64(fmt.Appendf(nil, `{"scope":"agent","town":"t1","rig":"r1","sub":"a1","exp":%d}`, time.Now().Add(time.Hour).Unix())) + "."
	otherRig := e.mustMintAgent("t1", "r2", "a1")

	batch := func(n int) string {
		evs := make([]string, n)
		for i := range evs {
			evs[i] = `{"type":"x"}`
		}
		return `{"events":[` + strings.Join(evs, ",") + `]}`
	}
	const ingest = "/api/rigs/r1/agent-events"
	const read = "/api/rigs/r1/agents/a1/events"
	cases := []struct {
		name, method, path, token, ctype, body string
		status                                 int
		code                                   string
	}{
		{"malformed json", "POST", ingest, e.agent, "application/json", `{"type":`, 400, "invalid_json"},
		{"not json at all", "POST", ingest, e.agent, "application/json", `hello`, 400, "invalid_json"},
		{"two json values", "POST", ingest, e.agent, "application/json", `{"type":"a"} {"type":"b"}`, 400, "invalid_json"},
		{"array body", "POST", ingest, e.agent, "application/json", `[{"type":"a"}]`, 400, "invalid_body"},
		{"type is a number", "POST", ingest, e.agent, "application/json", `{"type":7}`, 400, "invalid_field_type"},
		{"agent_id is an object", "POST", ingest, e.agent, "application/json", `{"type":"a","agent_id":{}}`, 400, "invalid_field_type"},
		{"events is an object", "POST", ingest, e.agent, "application/json", `{"events":{}}`, 400, "invalid_field_type"},
		{"unknown field", "POST", ingest, e.agent, "application/json", `{"type":"a","colour":"red"}`, 400, "unknown_field"},
		{"unknown field in batch", "POST", ingest, e.agent, "application/json", `{"events":[{"type":"a","x":1}]}`, 400, "unknown_field"},
		{"empty body", "POST", ingest, e.agent, "application/json", ``, 400, "empty_body"},
		{"type empty", "POST", ingest, e.agent, "application/json", `{"type":""}`, 400, "invalid_type"},
		{"type missing", "POST", ingest, e.agent, "application/json", `{"data":{}}`, 400, "invalid_type"},
		{"type 129 chars", "POST", ingest, e.agent, "application/json", `{"type":"` + strings.Repeat("a", 129) + `"}`, 400, "invalid_type"},
		{"type uppercase", "POST", ingest, e.agent, "application/json", `{"type":"Tool.Call"}`, 400, "invalid_type"},
		{"type with spaces", "POST", ingest, e.agent, "application/json", `{"type":"tool call"}`, 400, "invalid_type"},
		{"bad type in batch", "POST", ingest, e.agent, "application/json", `{"events":[{"type":"ok"},{"type":"NOT OK"}]}`, 400, "invalid_type"},
		{"data over 64 KiB", "POST", ingest, e.agent, "application/json", `{"type":"a","data":"` + strings.Repeat("x", 64<<10) + `"}`, 400, "data_too_large"},
		{"body over 1 MiB", "POST", ingest, e.agent, "application/json", `{"type":"a","data":"` + strings.Repeat("x", 1<<20) + `"}`, 413, "body_too_large"},
		{"empty batch", "POST", ingest, e.agent, "application/json", `{"events":[]}`, 400, "empty_batch"},
		{"batch over 1000", "POST", ingest, e.agent, "application/json", batch(1001), 400, "batch_too_large"},
		{"event and batch both", "POST", ingest, e.agent, "application/json", `{"type":"a","events":[{"type":"b"}]}`, 400, "invalid_body"},
		{"missing token", "POST", ingest, "", "application/json", `{"type":"a"}`, 401, "missing_token"},
		{"malformed token", "POST", ingest, "not.a.jwt", "application/json", `{"type":"a"}`, 401, "invalid_token"},
		{"expired token", "POST", ingest, expired, "application/json", `{"type":"a"}`, 401, "token_expired"},
		{"token without exp", "POST", ingest, noExp, "application/json", `{"type":"a"}`, 401, "invalid_token"},
		{"wrong secret", "POST", ingest, wrongSecret, "application/json", `{"type":"a"}`, 401, "invalid_token"},
		{"alg none", "POST", ingest, algNone, "application/json", `{"type":"a"}`, 401, "invalid_token"},
		{"agent_id not the token's sub", "POST", ingest, e.agent, "application/json", `{"agent_id":"a2","type":"a"}`, 403, "wrong_agent"},
		{"other agent in batch", "POST", ingest, e.agent, "application/json", `{"events":[{"type":"a"},{"agent_id":"a2","type":"a"}]}`, 403, "wrong_agent"},
		{"other rig", "POST", ingest, otherRig, "application/json", `{"type":"a"}`, 403, "wrong_rig"},
		{"viewer token on ingest", "POST", ingest, e.viewer, "application/json", `{"type":"a"}`, 403, "wrong_scope"},
		{"wrong content type", "POST", ingest, e.agent, "text/plain", `{"type":"a"}`, 415, "unsupported_media_type"},
		{"no content type", "POST", ingest, e.agent, "", `{"type":"a"}`, 415, "unsupported_media_type"},
		{"wrong method on ingest", "GET", ingest, e.agent, "", ``, 405, "method_not_allowed"},
		{"wrong method on read", "DELETE", read, e.viewer, "", ``, 405, "method_not_allowed"},
		{"after_id negative", "GET", read + "?after_id=-1", e.viewer, "", ``, 400, "invalid_cursor"},
		{"after_id not a number", "GET", read + "?after_id=abc", e.viewer, "", ``, 400, "invalid_cursor"},
		{"after_id too large", "GET", read + "?after_id=99999999999999999999", e.viewer, "", ``, 400, "invalid_cursor"},
		{"limit 0", "GET", read + "?limit=0", e.viewer, "", ``, 400, "invalid_limit"},
		{"limit 1001", "GET", read + "?limit=1001", e.viewer, "", ``, 400, "invalid_limit"},
		{"limit not a number", "GET", read + "?limit=ten", e.viewer, "", ``, 400, "invalid_limit"},
		{"read another agent with an agent token", "GET", "/api/rigs/r1/agents/a2/events", e.agent, "", ``, 403, "wrong_agent"},
		{"agents of another town", "GET", "/api/towns/t2/agents", e.viewer, "", ``, 403, "wrong_town"},
		{"agents with an agent token", "GET", "/api/towns/t1/agents", e.agent, "", ``, 403, "wrong_scope"},
		{"unknown path", "GET", "/api/nothing", e.viewer, "", ``, 404, "not_found"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.snapshot()
			status, hdr, body := e.do(tc.method, tc.path, tc.token, tc.ctype, []byte(tc.body))
			if status != tc.status || errCode(body) != tc.code {
				t.Fatalf("got %d %q (%v), want %d %q", status, errCode(body), body, tc.status, tc.code)
			}
			if status == 405 && hdr.Get("Allow") == "" {
				t.Fatal("405 without an Allow header")
			}
			if status == 401 && hdr.Get("WWW-Authenticate") == "" {
				t.Fatal("401 without WWW-Authenticate")
			}
			if after := e.snapshot(); after != before {
				t.Fatalf("the store changed:\nbefore %s\nafter  %s", before, after)
			}
		})
	}
}

func TestIngestAndReadBack(t *testing.T) {
	e := newEnv(t)
	code, v := e.post(e.agent, `{"agent_id":"a1","type":"message.part.updated","data":{ "delta" : "Hel" }}`)
	if code != 201 {
		t.Fatalf("single: %d %v", code, v)
	}
	code, v = e.post(e.agent, `{"events":[{"type":"tool.call","data":{"tool":"bash"}},{"type":"agent.exited","data":{"reason":"completed","exit_code":0}}]}`)
	if code != 201 {
		t.Fatalf("batch: %d %v", code, v)
	}
	ids := v["ids"].([]any)
	if len(ids) != 2 || ids[1].(float64) != ids[0].(float64)+1 {
		t.Fatalf("batch ids %v", ids)
	}

	// Page through with limit 2: has_more and next_after_id chain the pages.
	_, _, p1 := e.do("GET", "/api/rigs/r1/agents/a1/events?limit=2", e.viewer, "", nil)
	evs := p1["events"].([]any)
	if len(evs) != 2 || p1["has_more"] != true {
		t.Fatalf("page 1: %v", p1)
	}
	first := evs[0].(map[string]any)
	if first["type"] != "message.part.updated" || first["town_id"] != "t1" || first["rig_id"] != "r1" || first["agent_id"] != "a1" {
		t.Fatalf("event fields: %v", first)
	}
	if d := first["data"].(map[string]any); d["delta"] != "Hel" {
		t.Fatalf("data: %v", first["data"])
	}
	if _, err := time.Parse(time.RFC3339, first["created_at"].(string)); err != nil || !strings.HasSuffix(first["created_at"].(string), "Z") || len(first["created_at"].(string)) != len("2006-01-02T15:04:05.000Z") {
		t.Fatalf("created_at %v is not RFC 3339 UTC with ms", first["created_at"])
	}
	next := int64(p1["next_after_id"].(float64))
	_, _, p2 := e.do("GET", fmt.Sprintf("/api/rigs/r1/agents/a1/events?after_id=%d&limit=2", next), e.agent, "", nil)
	evs2 := p2["events"].([]any)
	if len(evs2) != 1 || p2["has_more"] != false || evs2[0].(map[string]any)["type"] != "agent.exited" {
		t.Fatalf("page 2: %v", p2)
	}
	_, _, p3 := e.do("GET", fmt.Sprintf("/api/rigs/r1/agents/a1/events?after_id=%d", int64(p2["next_after_id"].(float64))), e.viewer, "", nil)
	if len(p3["events"].([]any)) != 0 || p3["next_after_id"] != p2["next_after_id"] {
		t.Fatalf("page past the end: %v", p3)
	}

	// A viewer of another town reads nothing of t1, even by agent id.
	otherViewer, _ := e.auth.MintViewer("t2", time.Hour)
	_, _, pv := e.do("GET", "/api/rigs/r1/agents/a1/events", otherViewer, "", nil)
	if len(pv["events"].([]any)) != 0 {
		t.Fatalf("viewer of t2 read t1's events: %v", pv)
	}

	// The agent list shows a1 as exited; a second agent started later comes first.
	if code, _ := e.post(e.mustMintAgent("t1", "r1", "a2"), `{"type":"session.created"}`); code != 201 {
		t.Fatal(code)
	}
	_, _, al := e.do("GET", "/api/towns/t1/agents", e.viewer, "", nil)
	agents := al["agents"].([]any)
	if len(agents) != 2 {
		t.Fatalf("agents: %v", al)
	}
	a2, a1 := agents[0].(map[string]any), agents[1].(map[string]any)
	if a2["agent_id"] != "a2" || a2["exited"] != false || a1["agent_id"] != "a1" || a1["exited"] != true || a1["last_type"] != "agent.exited" || a1["rig_id"] != "r1" {
		t.Fatalf("agents: %v", agents)
	}
}

func TestHealthReadyMetrics(t *testing.T) {
	e := newEnv(t)
	if code, _ := e.post(e.agent, `{"events":[{"type":"a"},{"type":"b"},{"type":"c"}]}`); code != 201 {
		t.Fatal(code)
	}
	if code, _, v := e.do("GET", "/healthz", "", "", nil); code != 200 || v["status"] != "ok" {
		t.Fatalf("healthz %d %v", code, v)
	}
	if code, _, _ := e.do("GET", "/readyz", "", "", nil); code != 200 {
		t.Fatalf("readyz %d", code)
	}
	resp, err := e.client.Get(e.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	text, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		"agentstream_ingest_events_total 3",
		`agentstream_http_request_duration_seconds_count{code="201",route="POST /api/rigs/{rigId}/agent-events"} 1`,
		"agentstream_ingest_append_seconds_count 1",
		"agentstream_poll_feeds 0",
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// With the database gone, readiness fails with a JSON error and is counted.
	e.store.Close()
	if code, _, v := e.do("GET", "/readyz", "", "", nil); code != 503 || errCode(v) != "store_unavailable" {
		t.Fatalf("readyz after close: %d %v", code, v)
	}
	if code, _ := e.post(e.agent, `{"type":"a"}`); code != 503 {
		t.Fatalf("ingest after close: %d", code)
	}
}
