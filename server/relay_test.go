package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/server/container"
	"github.com/agentstream/agentstream/transport"
)

const relaySecret = "relay-test-container-secret-0123456789abcdef"

// upstreamEnv is a real container control API on 127.0.0.1 and a real
// `serve --upstream` in front of it, which a test can stop and start again
// on the same address and data directory.
type upstreamEnv struct {
	t        *testing.T
	c        *container.Container
	client   *container.Client
	dir      string
	db       string // the PostgreSQL database on that run; "" on SQLite (in dir)
	addr     string
	secret   string
	interval time.Duration
	log      *slog.Logger // the instances' log; default: discarded
	stop     func()
}

func newUpstreamEnv(t *testing.T, copts container.Options) *upstreamEnv {
	t.Helper()
	copts.Log = slog.New(slog.DiscardHandler)
	c := container.New(copts)
	cs := httptest.NewServer(c.Handler(relaySecret))
	e := &upstreamEnv{
		t: t, c: c, client: &container.Client{URL: cs.URL, Secret: relaySecret},
		dir: t.TempDir(), addr: "127.0.0.1:0", secret: strings.Repeat("s", 32), interval: 50 * time.Millisecond,
		log: slog.New(slog.DiscardHandler),
	}
	if current.Cluster != nil {
		e.db = current.DSN(t)
	}
	t.Cleanup(func() {
		if e.stop != nil {
			e.stop()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c.Close(ctx)
		cs.Close()
	})
	return e
}

// serve starts agentstream serve --upstream on e.addr; stop ends it as
// SIGTERM would.
func (e *upstreamEnv) serve() { e.addr, e.stop = e.start(e.addr) }

// start starts an instance of serve --upstream on addr and returns its
// address and what stops it.
func (e *upstreamEnv) start(addr string) (string, func()) {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, Config{
			Addr: addr, DataDir: e.dir, DB: e.db, Secret: e.secret, PollInterval: e.interval,
			Upstream: e.client.URL, UpstreamSecret: relaySecret, UpstreamTown: "t1", UpstreamRig: "r1",
			Log: e.log, Ready: func(a net.Addr) { ready <- a },
		})
	}()
	select {
	case a := <-ready:
		addr = a.String()
	case err := <-done:
		e.t.Fatalf("serve: %v", err)
	}
	var once sync.Once
	return addr, func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("serve: %v", err)
			}
		})
	}
}

func (e *upstreamEnv) viewer() string {
	auth, err := NewAuth([]byte(e.secret))
	if err != nil {
		e.t.Fatal(err)
	}
	tok, err := auth.MintViewer("t1", time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

// stored reads every event of agent through the read API.
func (e *upstreamEnv) stored(agent string) []model.Event {
	e.t.Helper()
	var all []model.Event
	var after int64
	for {
		req, _ := http.NewRequest("GET", fmt.Sprintf("http://%s/api/rigs/r1/agents/%s/events?after_id=%d&limit=1000", e.addr, agent, after), nil)
		req.Header.Set("Authorization", "Bearer "+e.viewer())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			e.t.Fatal(err)
		}
		var page struct {
			Events  []model.Event `json:"events"`
			HasMore bool          `json:"has_more"`
		}
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			e.t.Fatalf("read events: %d %v", resp.StatusCode, err)
		}
		all = append(all, page.Events...)
		if !page.HasMore {
			return all
		}
		after = page.Events[len(page.Events)-1].ID
	}
}

func (e *upstreamEnv) startAgent(id string, command ...string) {
	e.t.Helper()
	if _, err := e.client.Start(context.Background(), container.StartRequest{AgentID: id, Command: command}); err != nil {
		e.t.Fatal(err)
	}
}

func testScript(t testing.TB, name string) string {
	p, err := filepath.Abs(filepath.Join("..", "testdata", "container", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// checkRelayed checks that evs are the paced.sh session of n steps, each
// step and line once and in order, then agent.exited.
func checkRelayed(t *testing.T, evs []model.Event, n int, reason string) {
	t.Helper()
	var got []string
	for i, ev := range evs {
		if i > 0 && ev.ID <= evs[i-1].ID {
			t.Fatalf("id %d after %d", ev.ID, evs[i-1].ID)
		}
		got = append(got, ev.Type+" "+string(ev.Data))
	}
	var want []string
	for i := 1; i <= n; i++ {
		want = append(want, fmt.Sprintf(`step {"n":%d}`, i))
		if i%10 == 0 {
			want = append(want, fmt.Sprintf(`output.line {"stream":"stdout","line":"done %d"}`, i))
		}
	}
	want = append(want, fmt.Sprintf(`agent.exited {"reason":%q,"exit_code":0}`, reason))
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("relayed %d events, want %d:\n%s", len(got), len(want), diffLines(got, want))
	}
}

// diffLines shows the first place two event lists differ.
func diffLines(got, want []string) string {
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			return fmt.Sprintf("at %d: got %s, want %s", i, got[i], want[i])
		}
	}
	return fmt.Sprintf("one is a prefix of the other; got %d, want %d", len(got), len(want))
}

// TestRelayEndToEnd: a process in the container, serve --upstream, and an
// SSE client: the client sees the process's events in order, then
// agent.exited, then the stream ends. serve restarts twice while the agent
// runs; agent_events holds every event once.
func TestRelayEndToEnd(t *testing.T) {
	e := newUpstreamEnv(t, container.Options{})
	e.serve()
	const n = 150

	var mu sync.Mutex
	var seen []model.Event
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(seen)
	}
	followed := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	viewer := e.viewer()
	go func() {
		followed <- transport.Follow(ctx, transport.FollowOptions{
			URL:   "http://" + e.addr + "/api/towns/t1/container/agents/a1/stream",
			Token: viewer,
			OnEvent: func(id int64, data []byte) bool {
				var ev model.Event
				if err := json.Unmarshal(data, &ev); err != nil {
					t.Error(err)
				}
				mu.Lock()
				seen = append(seen, ev)
				mu.Unlock()
				return false // the server ends the stream, not the client
			},
		})
	}()
	// The stream is open before the agent exists: it waits.
	e.startAgent("a1", "sh", testScript(t, "paced.sh"), fmt.Sprint(n), "0.01")

	for _, at := range []int{20, 80} {
		waitUntil(t, fmt.Sprintf("%d events through the relay", at), func() bool { return count() >= at })
		e.stop()
		e.serve() // same address and data; the agent went on writing meanwhile
	}
	select {
	case err := <-followed:
		if !errors.Is(err, transport.ErrEnded) {
			t.Fatalf("follow ended with %v, want the stream's end (204 on resume)", err)
		}
	case <-ctx.Done():
		t.Fatalf("stream still open after %d events", count())
	}
	mu.Lock()
	checkRelayed(t, seen, n, "completed")
	mu.Unlock()
	checkRelayed(t, e.stored("a1"), n, "completed")
}

// TestRelayPersistsUnwatched: agents the container reports running are
// stored with nobody watching, and a late joiner gets the whole session —
// including what they wrote while serve was down.
func TestRelayPersistsUnwatched(t *testing.T) {
	e := newUpstreamEnv(t, container.Options{})
	e.startAgent("early", "sh", testScript(t, "paced.sh"), "30", "0")
	e.serve()
	waitUntil(t, "the unwatched agent stored", func() bool {
		evs := e.stored("early")
		return len(evs) > 0 && evs[len(evs)-1].Type == model.TypeExited
	})
	checkRelayed(t, e.stored("early"), 30, "completed")

	e.stop()
	e.startAgent("while-down", "sh", testScript(t, "paced.sh"), "20", "0")
	waitUntil(t, "the agent to exit while serve is down", func() bool {
		p, err := e.client.Events(context.Background(), "while-down", 0, 0)
		return err == nil && p.State == container.StateExited
	})
	e.serve()
	waitUntil(t, "the agent that ran while serve was down", func() bool {
		evs := e.stored("while-down")
		return len(evs) > 0 && evs[len(evs)-1].Type == model.TypeExited
	})
	checkRelayed(t, e.stored("while-down"), 20, "completed")
	checkRelayed(t, e.stored("early"), 30, "completed") // not stored again
}

// TestRelayReportsRingGap: when the container's ring dropped events the
// relay never read, the store says so with an upstream.gap event, once.
func TestRelayReportsRingGap(t *testing.T) {
	e := newUpstreamEnv(t, container.Options{RingLen: 50})
	e.startAgent("fast", "sh", testScript(t, "paced.sh"), "100", "0")
	waitUntil(t, "the agent to exit", func() bool {
		p, err := e.client.Events(context.Background(), "fast", 0, 0)
		return err == nil && p.State == container.StateExited
	})
	p, err := e.client.Events(context.Background(), "fast", 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	e.serve()
	waitUntil(t, "the ring relayed", func() bool {
		evs := e.stored("fast")
		return len(evs) > 0 && evs[len(evs)-1].Type == model.TypeExited
	})
	evs := e.stored("fast")
	// 100 steps, 10 lines and the exit make 111; the ring held the last 50.
	if len(evs) != 51 || evs[0].Type != TypeUpstreamGap || string(evs[0].Data) != fmt.Sprintf(`{"first_lost_seq":1,"last_lost_seq":61,"run":%q}`, p.Run) {
		t.Fatalf("%d events, first %s %s", len(evs), evs[0].Type, evs[0].Data)
	}
	if evs[1].Type != "step" || string(evs[1].Data) != `{"n":57}` {
		t.Fatalf("first relayed after the gap: %s %s", evs[1].Type, evs[1].Data)
	}
	// And the operator sees it counted.
	resp, err := http.Get("http://" + e.addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, want := range []string{"agentstream_relay_lost_events_total 61\n", "agentstream_relay_events_total 50\n"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// flakyFront is an HTTP front for the container on a fixed address that a
// test can take down and bring back, as a network outage would.
type flakyFront struct {
	t      *testing.T
	addr   string
	target http.Handler
	srv    *http.Server
}

func (f *flakyFront) up() {
	f.t.Helper()
	ln, err := net.Listen("tcp", f.addr)
	if err != nil {
		f.t.Fatal(err)
	}
	f.addr = ln.Addr().String()
	f.srv = &http.Server{Handler: f.target}
	go f.srv.Serve(ln)
}

func (f *flakyFront) down() { f.srv.Close() }

// TestRelayRidesOutContainerOutage: the container's API is unreachable for
// a while as its agent goes on writing; once it is back, the relay stores
// what the ring kept, each event once, and the agent's feed ends as usual.
func TestRelayRidesOutContainerOutage(t *testing.T) {
	e := newUpstreamEnv(t, container.Options{})
	front := &flakyFront{t: t, addr: "127.0.0.1:0", target: e.c.Handler(relaySecret)}
	front.up()
	defer front.down()
	e.client = &container.Client{URL: "http://" + front.addr, Secret: relaySecret}
	e.serve()

	const n = 60
	e.startAgent("a1", "sh", testScript(t, "paced.sh"), fmt.Sprint(n), "0.02")
	waitUntil(t, "the first events relayed", func() bool { return len(e.stored("a1")) >= 5 })
	front.down()
	waitUntil(t, "the agent to exit during the outage", func() bool {
		p := e.c.Events("a1", 0, 1)
		return p.State == container.StateExited
	})
	front.up()
	waitUntil(t, "the rest relayed after the outage", func() bool {
		evs := e.stored("a1")
		return len(evs) > 0 && evs[len(evs)-1].Type == model.TypeExited
	})
	checkRelayed(t, e.stored("a1"), n, "completed")
}

// TestRelayHonoursRetryAfter: a container that answers 429 with
// Retry-After is not asked again, by the list or by a pull, before then.
func TestRelayHonoursRetryAfter(t *testing.T) {
	var calls atomic.Int32
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Retry-After", "600")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		w.Write([]byte(`{"error":{"code":"busy","message":"later"}}`))
	}))
	defer front.Close()
	store, err := model.Open(context.Background(), current.DSN(t), model.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	sched := poll.New(store, poll.Options{})
	defer sched.Close()
	r := NewRelay(&container.Client{URL: front.URL, Secret: relaySecret}, store, "t1", "r1", slog.New(slog.DiscardHandler))
	if err := r.sync(context.Background(), sched); err == nil {
		t.Fatal("a 429 from the container was not an error")
	}
	for range 3 {
		if err := r.sync(context.Background(), sched); err != nil {
			t.Fatalf("list during Retry-After: %v", err)
		}
		if n, err := r.Pull(context.Background(), model.AgentKey{Town: "t1", Agent: "a1"}); n != 0 || err != nil {
			t.Fatalf("pull during Retry-After: %d %v", n, err)
		}
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("the container was asked %d times; after its Retry-After, once", n)
	}
}

// errorLog is a slog.Handler that keeps the ERROR records it is given.
type errorLog struct {
	mu   sync.Mutex
	msgs []string
}

func (l *errorLog) Enabled(_ context.Context, lv slog.Level) bool { return lv >= slog.LevelError }
func (l *errorLog) WithAttrs([]slog.Attr) slog.Handler            { return l }
func (l *errorLog) WithGroup(string) slog.Handler                 { return l }

func (l *errorLog) Handle(_ context.Context, r slog.Record) error {
	msg := r.Message
	r.Attrs(func(a slog.Attr) bool {
		msg += " " + a.String()
		return true
	})
	l.mu.Lock()
	l.msgs = append(l.msgs, msg)
	l.mu.Unlock()
	return nil
}

func (l *errorLog) records() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.msgs)
}
