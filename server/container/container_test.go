package container

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

const testSecret = "container-test-secret-0123456789abcdef"

var quiet = slog.New(slog.DiscardHandler)

// liveInGroup lists the processes of group pgid that are not zombies
// (children orphaned into a container may wait a while for a reaper).
func liveInGroup(t *testing.T, pgid int) []string {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil || len(stats) == 0 {
		t.Skip("no /proc to look for processes in")
	}
	var live []string
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // gone meanwhile
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 2 && f[2] == strconv.Itoa(pgid) && f[0] != "Z" {
			live = append(live, p)
		}
	}
	return live
}

type env struct {
	c      *Container
	url    string
	client *Client
	clock  *clock
}

// clock is a settable clock for the buffer TTL.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// newEnv runs a Container behind its control API on a real listener.
func newEnv(t *testing.T, opts Options) *env {
	t.Helper()
	clk := &clock{t: time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)}
	if opts.Now == nil {
		opts.Now = clk.Now
	}
	opts.Log = quiet
	c := New(opts)
	srv := httptest.NewServer(c.Handler(testSecret))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
		srv.Close()
	})
	return &env{c: c, url: srv.URL, client: &Client{URL: srv.URL, Secret: testSecret}, clock: clk}
}

func script(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "testdata", "container", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (e *env) start(t *testing.T, id, name string, args ...string) AgentInfo {
	t.Helper()
	info, err := e.client.Start(context.Background(), StartRequest{AgentID: id, Command: append([]string{"sh", script(t, name)}, args...)})
	if err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	return info
}

// waitFor polls cond until it holds, failing the test after 20 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// events reads every event of id the ring holds, through the API.
func (e *env) events(t *testing.T, id string) []Event {
	t.Helper()
	p, err := e.client.Events(context.Background(), id, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return p.Events
}

// waitExit waits for id's agent.exited and returns all its events.
func (e *env) waitExit(t *testing.T, id string) ([]Event, ExitData) {
	t.Helper()
	var evs []Event
	waitFor(t, id+" to exit", func() bool {
		evs = e.events(t, id)
		return len(evs) > 0 && evs[len(evs)-1].Type == "agent.exited"
	})
	var exit ExitData
	if err := json.Unmarshal(evs[len(evs)-1].Data, &exit); err != nil {
		t.Fatal(err)
	}
	return evs, exit
}

func TestSessionEvents(t *testing.T) {
	t.Setenv(SecretEnv, testSecret) // the container's own: it must not reach the agents
	e := newEnv(t, Options{})
	dir := t.TempDir()
	info, err := e.client.Start(context.Background(), StartRequest{
		AgentID: "a1", Command: []string{"sh", script(t, "session.sh"), "0"},
		Env: map[string]string{"X": "from-request"}, Dir: dir,
	})
	if err != nil {
		t.Fatal(err)
	}
	if info.State != StateRunning || info.PID == 0 || len(info.Run) != 16 {
		t.Fatalf("start answered %+v", info)
	}
	evs, exit := e.waitExit(t, "a1")
	for i, ev := range evs {
		if ev.Seq != int64(i+1) {
			t.Fatalf("event %d has seq %d", i, ev.Seq)
		}
	}
	var stdout []string
	var stderr []string
	for _, ev := range evs[:len(evs)-1] {
		if ev.Type == TypeOutputLine {
			var d outputLine
			json.Unmarshal(ev.Data, &d)
			if d.Stream == "stderr" {
				stderr = append(stderr, d.Line)
				continue
			}
			stdout = append(stdout, "line: "+d.Line)
			continue
		}
		stdout = append(stdout, ev.Type+" "+string(ev.Data))
	}
	want := []string{
		`session.started {"model":"test"}`,
		`line: plain text line`,
		`tool.call {"type":"tool.call","name":"grep","args":["-n","x"]}`,
		`line: {"type":"Not A Type"}`,
		`line: ["not","an","object"]`,
		fmt.Sprintf(`env {"x":"from-request","secret":"","pwd":"%s","agent":"a1"}`, dir),
	}
	if strings.Join(stdout, "\n") != strings.Join(want, "\n") {
		t.Fatalf("stdout events:\n%s\nwant:\n%s", strings.Join(stdout, "\n"), strings.Join(want, "\n"))
	}
	if len(stderr) != 1 || stderr[0] != "warning: on stderr" {
		t.Fatalf("stderr lines %q", stderr)
	}
	if exit != (ExitData{Reason: ReasonCompleted}) {
		t.Fatalf("exit %+v", exit)
	}
	list, err := e.client.Agents(context.Background())
	if err != nil || len(list) != 1 || list[0].State != StateExited || *list[0].ExitCode != 0 || list[0].Reason != ReasonCompleted || list[0].LastSeq != int64(len(evs)) {
		t.Fatalf("agents %+v, %v", list, err)
	}
}

func TestExitReasons(t *testing.T) {
	t.Setenv(SecretEnv, testSecret)                 // must not reach the agents
	e := newEnv(t, Options{Grace: 2 * time.Second}) // long enough for the shell to run its TERM trap on a busy machine
	ctx := context.Background()

	e.start(t, "fails", "session.sh", "3")
	e.start(t, "killed", "killself.sh")
	e.start(t, "stopped", "sleeper.sh")
	e.start(t, "stubborn", "ignore-term.sh")
	waitFor(t, "both long runners ready", func() bool {
		return len(e.events(t, "stopped")) > 0 && len(e.events(t, "stubborn")) > 0
	})

	// A second start of a running id is refused.
	if _, err := e.client.Start(ctx, StartRequest{AgentID: "stopped", Command: []string{"true"}}); !isStatus(err, http.StatusConflict) {
		t.Fatalf("second start: %v, want 409", err)
	}
	for _, id := range []string{"stopped", "stubborn"} {
		info, err := e.client.Stop(ctx, id)
		if err != nil || info.State != StateRunning {
			t.Fatalf("stop %s: %+v, %v", id, info, err)
		}
	}
	// The stubborn one heard SIGTERM and went on: only the SIGKILL after
	// the grace period ends it (its exit below).
	waitFor(t, "SIGTERM to be ignored", func() bool {
		for _, ev := range e.events(t, "stubborn") {
			if ev.Type == "term.ignored" {
				return true
			}
		}
		return false
	})

	for id, want := range map[string]ExitData{
		"fails":    {Reason: ReasonFailed, ExitCode: 3},
		"killed":   {Reason: ReasonFailed, ExitCode: 137, Signal: "killed"},
		"stopped":  {Reason: ReasonStopped, ExitCode: 143, Signal: "terminated"},
		"stubborn": {Reason: ReasonStopped, ExitCode: 137, Signal: "killed"},
	} {
		if _, got := e.waitExit(t, id); got != want {
			t.Errorf("%s exited %+v, want %+v", id, got, want)
		}
	}
	// Stopping an exited agent changes nothing; an unknown one is 404.
	if info, err := e.client.Stop(ctx, "fails"); err != nil || info.Reason != ReasonFailed {
		t.Fatalf("stop after exit: %+v, %v", info, err)
	}
	if _, err := e.client.Stop(ctx, "nobody"); !isStatus(err, http.StatusNotFound) {
		t.Fatalf("stop unknown: %v", err)
	}
	// An exited id can start again: a new run, counting from 1.
	old := e.c.Events("fails", 0, 1).Run
	info := e.start(t, "fails", "session.sh", "0")
	if info.Run == old {
		t.Fatal("a restarted agent kept its run id")
	}
	evs, _ := e.waitExit(t, "fails")
	if evs[0].Seq != 1 {
		t.Fatalf("new run starts at seq %d", evs[0].Seq)
	}
}

func isStatus(err error, status int) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == status
}

func TestLongLineIsCut(t *testing.T) {
	e := newEnv(t, Options{})
	e.start(t, "big", "bigline.sh")
	evs, _ := e.waitExit(t, "big")
	if len(evs) != 3 {
		t.Fatalf("%d events, want the cut line, the next line and the exit", len(evs))
	}
	var big, next outputLine
	json.Unmarshal(evs[0].Data, &big)
	json.Unmarshal(evs[1].Data, &next)
	if !big.Truncated || big.Bytes != 2<<20 || len(big.Line) != MaxLine || strings.Trim(big.Line, "x") != "" {
		t.Fatalf("cut line: truncated %v, bytes %d, kept %d", big.Truncated, big.Bytes, len(big.Line))
	}
	if next.Line != "after" || next.Truncated {
		t.Fatalf("line after the long one: %+v", next)
	}
}

func TestRingWraps(t *testing.T) {
	e := newEnv(t, Options{})
	e.start(t, "many", "count.sh", "1200")
	e.waitExit(t, "many")
	ctx := context.Background()
	// 1200 steps and the exit: the ring holds the newest 500.
	for _, tc := range []struct {
		after, limit      int64
		firstSeq, lastSeq int64 // of the events returned
		n                 int
	}{
		{0, 0, 702, 1201, 500},     // older than the ring: the oldest held
		{701, 0, 702, 1201, 500},   // exactly at the ring's edge
		{1000, 0, 1001, 1201, 201}, // inside
		{1000, 10, 1001, 1010, 10}, // a page
		{1201, 0, 0, 0, 0},         // caught up
		{5000, 0, 0, 0, 0},         // ahead: nothing, no error
	} {
		p, err := e.client.Events(ctx, "many", tc.after, int(tc.limit))
		if err != nil {
			t.Fatal(err)
		}
		if p.FirstSeq != 702 || p.LastSeq != 1201 || len(p.Events) != tc.n {
			t.Fatalf("after %d: first_seq %d last_seq %d, %d events", tc.after, p.FirstSeq, p.LastSeq, len(p.Events))
		}
		if tc.n == 0 {
			continue
		}
		if p.Events[0].Seq != tc.firstSeq || p.Events[tc.n-1].Seq != tc.lastSeq {
			t.Fatalf("after %d: events %d..%d, want %d..%d", tc.after, p.Events[0].Seq, p.Events[tc.n-1].Seq, tc.firstSeq, tc.lastSeq)
		}
		for i := 1; i < tc.n; i++ {
			if p.Events[i].Seq != p.Events[i-1].Seq+1 {
				t.Fatalf("after %d: seq %d follows %d", tc.after, p.Events[i].Seq, p.Events[i-1].Seq)
			}
		}
		var d struct{ N int64 }
		if json.Unmarshal(p.Events[0].Data, &d); p.Events[0].Type == "step" && d.N != p.Events[0].Seq {
			t.Fatalf("seq %d holds step %d", p.Events[0].Seq, d.N)
		}
	}
	// An unknown agent has an empty list, not an error.
	p, err := e.client.Events(ctx, "nobody", 0, 0)
	if err != nil || len(p.Events) != 0 || p.Run != "" {
		t.Fatalf("unknown agent: %+v, %v", p, err)
	}
}

func TestBufferDroppedAfterTTL(t *testing.T) {
	e := newEnv(t, Options{TTL: 5 * time.Minute})
	e.start(t, "done", "session.sh", "0")
	e.start(t, "busy", "sleeper.sh")
	e.waitExit(t, "done")
	ctx := context.Background()
	ids := func() (ids []string) {
		list, err := e.client.Agents(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range list {
			ids = append(ids, a.AgentID)
		}
		return ids
	}
	e.clock.Add(5*time.Minute - time.Second)
	if got := ids(); len(got) != 2 || len(e.events(t, "done")) == 0 {
		t.Fatalf("before the TTL: agents %v", got)
	}
	e.clock.Add(time.Second)
	if got := ids(); len(got) != 1 || got[0] != "busy" {
		t.Fatalf("after the TTL: agents %v, want only the running one", got)
	}
	if evs := e.events(t, "done"); len(evs) != 0 {
		t.Fatalf("dropped agent still has %d events", len(evs))
	}
	// A running agent is never dropped, however long it runs.
	e.clock.Add(time.Hour)
	if got := ids(); len(got) != 1 {
		t.Fatalf("running agent dropped: %v", got)
	}
}

func TestBadRequests(t *testing.T) {
	e := newEnv(t, Options{})
	marker := filepath.Join(t.TempDir(), "started")
	good := fmt.Sprintf(`{"agent_id":"a","command":["sh","-c","touch %s"]}`, marker)
	for _, tc := range []struct {
		name, method, path, auth, ctype, body string
		status                                int
		code                                  string
	}{
		{"no secret", "POST", "/agents", "", "application/json", good, 401, "unauthorized"},
		{"wrong secret", "POST", "/agents", "Bearer nope", "application/json", good, 401, "unauthorized"},
		{"secret as plain", "GET", "/agents", testSecret, "", "", 401, "unauthorized"},
		{"empty command", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":[]}`, 400, "invalid_request"},
		{"no command", "POST", "/agents", "", "application/json", `{"agent_id":"a"}`, 400, "invalid_request"},
		{"empty program", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":[""]}`, 400, "invalid_request"},
		{"bad json", "POST", "/agents", "", "application/json", `{"agent_id":"a",`, 400, "invalid_json"},
		{"unknown field", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":["true"],"cmd":"x"}`, 400, "invalid_json"},
		{"wrong type", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":"true"}`, 400, "invalid_json"},
		{"two values", "POST", "/agents", "", "application/json", good + good, 400, "invalid_json"},
		{"bad agent id", "POST", "/agents", "", "application/json", `{"agent_id":"a/b","command":["true"]}`, 400, "invalid_request"},
		{"no agent id", "POST", "/agents", "", "application/json", `{"command":["true"]}`, 400, "invalid_request"},
		{"missing dir", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":["true"],"dir":"/no/such/dir"}`, 400, "invalid_request"},
		{"secret in env", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":["true"],"env":{"AGENTSTREAM_CONTAINER_SECRET":"x"}}`, 400, "invalid_request"},
		{"bad env name", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":["true"],"env":{"A=B":"x"}}`, 400, "invalid_request"},
		{"no such program", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":["/no/such/program"]}`, 400, "invalid_request"},
		{"text body", "POST", "/agents", "", "text/plain", good, 415, "unsupported_media_type"},
		{"huge body", "POST", "/agents", "", "application/json", `{"agent_id":"a","command":["` + strings.Repeat("x", maxBody) + `"]}`, 413, "body_too_large"},
		{"negative after", "GET", "/agents/a/events?after=-1", "", "", "", 400, "invalid_cursor"},
		{"word after", "GET", "/agents/a/events?after=abc", "", "", "", 400, "invalid_cursor"},
		{"huge after", "GET", "/agents/a/events?after=99999999999999999999", "", "", "", 400, "invalid_cursor"},
		{"zero limit", "GET", "/agents/a/events?limit=0", "", "", "", 400, "invalid_limit"},
		{"big limit", "GET", "/agents/a/events?limit=1001", "", "", "", 400, "invalid_limit"},
		{"events no secret", "GET", "/agents/a/events", "", "", "", 401, "unauthorized"},
		{"no route", "PUT", "/agents", "", "", "", 404, "not_found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, e.url+tc.path, strings.NewReader(tc.body))
			auth := tc.auth
			if auth == "" && tc.code != "unauthorized" {
				auth = "Bearer " + testSecret
			}
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var body struct {
				Error struct{ Code, Message string }
			}
			if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
				t.Fatalf("body is not JSON: %v", err)
			}
			if resp.StatusCode != tc.status || body.Error.Code != tc.code || body.Error.Message == "" {
				t.Fatalf("%d %+v, want %d %s", resp.StatusCode, body.Error, tc.status, tc.code)
			}
		})
	}
	if list := e.c.Agents(); len(list) != 0 {
		t.Fatalf("bad requests started %+v", list)
	}
	// A field keeps its name as written: agent_id, not Agent_id.
	req, _ := http.NewRequest("POST", e.url+"/agents", strings.NewReader(`{"agent_id":"Bad Id","command":["true"]}`))
	req.Header.Set("Authorization", "Bearer "+testSecret)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var body struct{ Error struct{ Message string } }
	json.NewDecoder(resp.Body).Decode(&body)
	resp.Body.Close()
	if !strings.HasPrefix(body.Error.Message, `agent_id "Bad Id" has a character outside`) {
		t.Fatalf("message %q, want it to start with the field's own name", body.Error.Message)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("a refused request ran its command")
	}
}

// TestCloseStopsAgents: shutting the container down ends its agents and
// every goroutine it started.
func TestCloseStopsAgents(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := New(Options{Grace: 200 * time.Millisecond, Log: quiet})
	var pids []int
	for _, name := range []string{"sleeper.sh", "ignore-term.sh"} {
		info, err := c.Start(StartRequest{AgentID: name, Command: []string{"sh", script(t, name)}})
		if err != nil {
			t.Fatal(err)
		}
		pids = append(pids, info.PID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, a := range c.Agents() {
		if a.State != StateExited || a.Reason != ReasonStopped {
			t.Fatalf("after Close: %+v", a)
		}
	}
	for _, pid := range pids {
		if live := liveInGroup(t, pid); len(live) > 0 {
			t.Fatalf("process group %d still has %v after Close", pid, live)
		}
	}
	if _, err := c.Start(StartRequest{AgentID: "late", Command: []string{"true"}}); !errors.Is(err, ErrClosed) {
		t.Fatalf("start after close: %v", err)
	}
	goleak.VerifyNone(t, ignore)
}
