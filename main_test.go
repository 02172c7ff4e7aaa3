package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// buildBinary builds agentstream into a temp dir, once per test run.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "agentstream")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	// -buildvcs=auto stamps the VCS revision (for the version command),
	// whatever GOFLAGS says; where git is there but refuses (a checkout
	// owned by another user), build as GOFLAGS says instead.
	out, err := exec.Command("go", append(append([]string{"build", "-buildvcs=auto"}, args[1:]...), ".")...).CombinedOutput()
	if err != nil && strings.Contains(string(out), "VCS status") {
		out, err = exec.Command("go", append(args, ".")...).CombinedOutput()
	}
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// cleanEnv is the environment without AGENTSTREAM_* settings of the caller.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AGENTSTREAM_") {
			env = append(env, kv)
		}
	}
	return env
}

func runCmd(t *testing.T, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = cleanEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", bin, args, err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// serveProc is a running `agentstream serve` process.
type serveProc struct {
	cmd  *exec.Cmd
	base string
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, once done is closed
}

// startServer starts serve on a free loopback port and waits until its log
// says where it listens.
func startServer(t *testing.T, bin, data string) *serveProc {
	t.Helper()
	return startServerAt(t, bin, data, "127.0.0.1:0")
}

func startServerAt(t *testing.T, bin, data, addr string) *serveProc {
	t.Helper()
	cmd := exec.Command(bin, "serve", "--addr", addr, "--data", data, "--log-format", "json")
	cmd.Env = cleanEnv()
	return startListening(t, cmd, "listening")
}

// startListening starts cmd, which logs JSON, and waits for its log line
// msg to say where it listens.
func startListening(t *testing.T, cmd *exec.Cmd, msg string) *serveProc {
	t.Helper()
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &serveProc{cmd: cmd, done: make(chan struct{})}
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var line struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == msg {
				addrc <- line.Addr
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	go func() { s.err = cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-s.done
	})
	select {
	case a := <-addrc:
		s.base = "http://" + a
	case <-s.done:
		t.Fatalf("%s exited before listening: %v", cmd.Args[1], s.err)
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not report its address within 60 s", cmd.Args[1])
	}
	return s
}

func postEvent(t *testing.T, base, token, body string) []int64 {
	t.Helper()
	return postEventTo(t, base, "r", token, body)
}

// postEventTo is postEvent for an agent of rig.
func postEventTo(t *testing.T, base, rig, token, body string) []int64 {
	t.Helper()
	req, _ := http.NewRequest("POST", base+"/api/rigs/"+rig+"/agent-events", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct{ IDs []int64 }
	json.NewDecoder(resp.Body).Decode(&v)
	if resp.StatusCode != 201 || len(v.IDs) == 0 {
		t.Fatalf("post: %d %v", resp.StatusCode, v)
	}
	return v.IDs
}

type wireEvent struct {
	ID      int64
	AgentID string `json:"agent_id"`
	Type    string
	Data    json.RawMessage
}

func readEvents(t *testing.T, base, token string) []wireEvent {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/api/rigs/r/agents/a/events?limit=1000", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct{ Events []wireEvent }
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil || resp.StatusCode != 200 {
		t.Fatalf("read: %d %v", resp.StatusCode, err)
	}
	return v.Events
}

// TestKill9KeepsAcknowledgedEvents: every event the server acknowledged is
// still there, in order, after kill -9 and a restart. Tokens come from the
// token command on the same --data, from the secret serve made there (mode
// 0600), so this also proves that serve accepts them.
func TestKill9KeepsAcknowledgedEvents(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, bin, data)
	if fi, err := os.Stat(filepath.Join(data, "secret")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("generated secret: %v, mode %v", err, fi.Mode())
	}
	agent := runCmd(t, bin, "token", "agent", "--town", "t", "--rig", "r", "--agent", "a", "--data", data)
	viewer := runCmd(t, bin, "token", "viewer", "--town", "t", "--data", data)

	var acked []int64
	for i := range 100 {
		acked = append(acked, postEvent(t, s.base, agent, fmt.Sprintf(`{"type":"step","data":{"n":%d}}`, i))...)
	}
	if err := s.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-s.done

	s = startServer(t, bin, data)
	got := readEvents(t, s.base, viewer)
	if len(got) != len(acked) {
		t.Fatalf("read back %d events after kill -9, acknowledged %d", len(got), len(acked))
	}
	for i, e := range got {
		if e.ID != acked[i] || e.Type != "step" || string(e.Data) != fmt.Sprintf(`{"n":%d}`, i) {
			t.Fatalf("event %d: %+v, want id %d n %d", i, e, acked[i], i)
		}
	}

	// SIGTERM is a clean stop: exit status 0.
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		if s.err != nil {
			t.Fatalf("serve after SIGTERM: %v, want exit 0", s.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30 s of SIGTERM")
	}
}

// writeSecret puts a secret in data, as serve makes one there.
func writeSecret(t *testing.T, data string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(data, "secret"), []byte(strings.Repeat("ab", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestExitStatus(t *testing.T) {
	data := t.TempDir()
	writeSecret(t, data)
	t.Setenv("AGENTSTREAM_DATA", data)
	t.Setenv("AGENTSTREAM_CONTAINER_SECRET", "")
	cases := []struct {
		args []string
		want int
	}{
		{nil, 2},
		{[]string{"bogus"}, 2},
		{[]string{"token"}, 2},
		{[]string{"token", "viewer"}, 2},
		{[]string{"token", "agent", "--town", "t"}, 2},
		{[]string{"token", "viewer", "--town", "t", "--ttl", "-1h"}, 2},
		{[]string{"serve", "--log-format", "xml"}, 2},
		{[]string{"serve", "--no-such-flag"}, 2},
		{[]string{"serve", "--db", "mysql://x"}, 1},
		{[]string{"serve", "--upstream", "http://127.0.0.1:1"}, 2},
		{[]string{"serve", "--upstream", "ftp://x", "--upstream-town", "t", "--upstream-rig", "r"}, 2},
		{[]string{"container"}, 2}, // no secret
		{[]string{"run", "--agent", "a", "--token", "x", "--", "true"}, 2},
		{[]string{"run", "--rig", "r", "--agent", "a", "--token", "x"}, 2},
		{[]string{"run", "--rig", "r", "--agent", "a", "--", "true"}, 2},
		{[]string{"run", "--rig", "r", "--agent", "a", "--token", "x", "--", "/no/such/program"}, 2},
		{[]string{"emit"}, 2},
		{[]string{"emit", "--rig", "r", "--agent", "a"}, 2},
		{[]string{"emit", "--rig", "r", "--agent", "a", "--token", "x", "extra"}, 2},
		{[]string{"token", "viewer", "--town", "t"}, 0},
		{[]string{"token", "viewer", "--town", "t", "--data", t.TempDir()}, 1}, // no secret there
		{[]string{"help"}, 0},
	}
	for _, tc := range cases {
		var out, errOut bytes.Buffer
		if got := run(tc.args, &out, &errOut); got != tc.want {
			t.Errorf("agentstream %v: exit %d, want %d (stderr %q)", tc.args, got, tc.want, errOut.String())
		}
		if tc.want == 2 && !strings.Contains(errOut.String(), "agentstream: ") {
			t.Errorf("agentstream %v: no one-line reason on stderr", tc.args)
		}
	}
}

// TestFlagBeatsEnvironment: AGENTSTREAM_<FLAG> fills a flag, and the flag
// wins when both are given.
func TestFlagBeatsEnvironment(t *testing.T) {
	dirEnv, dirFlag := t.TempDir(), t.TempDir()
	writeSecret(t, dirFlag)
	t.Setenv("AGENTSTREAM_DATA", dirEnv)
	var errOut bytes.Buffer
	if run([]string{"token", "viewer", "--town", "t"}, io.Discard, &errOut) != 1 || !strings.Contains(errOut.String(), filepath.Join(dirEnv, "secret")) {
		t.Fatalf("token with AGENTSTREAM_DATA, which holds no secret: %q, want an error naming its secret's path", errOut.String())
	}
	if run([]string{"token", "viewer", "--town", "t", "--data", dirFlag}, io.Discard, io.Discard) != 0 {
		t.Fatal("--data did not win over AGENTSTREAM_DATA")
	}
}

// TestTailFollowsAcrossRestart: tail prints every event exactly once, in
// order, across a restart of the server, and exits 0 after agent.exited.
func TestTailFollowsAcrossRestart(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, bin, data)
	agent := runCmd(t, bin, "token", "agent", "--town", "t", "--rig", "r", "--agent", "a", "--data", data)
	var acked []int64
	for i := range 3 {
		acked = append(acked, postEvent(t, s.base, agent, fmt.Sprintf(`{"type":"step","data":{"n":%d}}`, i))...)
	}
	tail := startTailLines(t, bin, "--town", "t", "--agent", "a", "--server", s.base, "--json", "--data", data)
	var got []int64
	next := func() {
		t.Helper()
		l := tail.next()
		var ev wireEvent
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			t.Fatalf("tail printed %q: %v", l, err)
		}
		got = append(got, ev.ID)
	}
	for range 3 {
		next()
	}
	addr := strings.TrimPrefix(s.base, "http://")
	s.cmd.Process.Signal(syscall.SIGTERM)
	<-s.done
	s = startServerAt(t, bin, data, addr)
	for i := 3; i < 6; i++ {
		acked = append(acked, postEvent(t, s.base, agent, fmt.Sprintf(`{"type":"step","data":{"n":%d}}`, i))...)
	}
	acked = append(acked, postEvent(t, s.base, agent, `{"type":"agent.exited","data":{"reason":"completed","exit_code":0}}`)...)
	for range 4 {
		next()
	}
	if err := tail.cmd.Wait(); err != nil {
		t.Fatalf("tail after agent.exited: %v (stderr %s), want exit 0", err, tail.stderr.String())
	}
	if !slices.Equal(got, acked) {
		t.Fatalf("tail printed ids %v, want %v", got, acked)
	}
}

// tailLines is a running `agentstream tail`, its output read line by line
// while it runs.
type tailLines struct {
	t      *testing.T
	cmd    *exec.Cmd
	lines  chan string
	stderr *bytes.Buffer
}

func startTailLines(t *testing.T, bin string, args ...string) *tailLines {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"tail"}, args...)...)
	cmd.Env = cleanEnv()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &tailLines{t: t, cmd: cmd, lines: make(chan string, 100), stderr: new(bytes.Buffer)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
	}()
	return p
}

// next returns tail's next line of output, failing the test if tail ends
// or prints nothing for 60 s.
func (p *tailLines) next() string {
	p.t.Helper()
	select {
	case l, ok := <-p.lines:
		if !ok {
			p.t.Fatalf("tail ended early; stderr: %s", p.stderr.String())
		}
		return l
	case <-time.After(60 * time.Second):
		p.t.Fatalf("tail printed nothing for 60 s; stderr: %s", p.stderr.String())
	}
	return ""
}

// interrupt stops tail as Ctrl-C does; it must exit 0.
func (p *tailLines) interrupt() {
	p.t.Helper()
	p.cmd.Process.Signal(os.Interrupt)
	if err := p.cmd.Wait(); err != nil {
		p.t.Fatalf("tail after an interrupt: %v (stderr %s), want exit 0", err, p.stderr.String())
	}
}

// TestLimitAndSecretUsage: limits that cannot work and a container secret
// shorter than 32 bytes are usage errors that name the flag or variable.
func TestLimitAndSecretUsage(t *testing.T) {
	t.Setenv("AGENTSTREAM_DATA", t.TempDir())
	cases := []struct {
		env  string
		args []string
		says string
	}{
		{"", []string{"serve", "--ingest-burst", "10"}, "--ingest-burst"},
		{"", []string{"serve", "--max-streams-per-town", "0"}, "--max-streams-per-town"},
		{"", []string{"serve", "--body-timeout", "0s"}, "--body-timeout"},
		{"short", []string{"container"}, "AGENTSTREAM_CONTAINER_SECRET"},
		{"", []string{"serve", "--addr", "127.0.0.1:0"}, "AGENTSTREAM_SECRET is 5 bytes"},
		{"", []string{"token", "viewer", "--town", "t"}, "AGENTSTREAM_SECRET is 5 bytes"},
		{strings.Repeat("k", 32), []string{"container", "--agent-env", "all"}, "--agent-env"},
		{strings.Repeat("k", 32), []string{"container", "--agent-env", "minimal", "--agent-env-allow", "AGENTSTREAM_SECRET"}, "--agent-env-allow"},
	}
	for _, tc := range cases {
		t.Setenv("AGENTSTREAM_CONTAINER_SECRET", tc.env)
		t.Setenv("AGENTSTREAM_SECRET", "")
		if strings.Contains(tc.says, "AGENTSTREAM_SECRET is") {
			t.Setenv("AGENTSTREAM_SECRET", "short")
		}
		var out, errOut bytes.Buffer
		if got := run(tc.args, &out, &errOut); got != 2 || !strings.Contains(errOut.String(), tc.says) {
			t.Errorf("agentstream %v: exit %d, stderr %q; want 2 naming %s", tc.args, got, errOut.String(), tc.says)
		}
	}
}

// TestTailWarnsOfGap: tail resuming from an id that retention has deleted
// says so on stderr, then prints the events still held; the page read of
// the same cursor carries the gap.
func TestTailWarnsOfGap(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	cmd := exec.Command(bin, "serve", "--addr", "127.0.0.1:0", "--data", data, "--log-format", "json", "--retain", "5")
	cmd.Env = cleanEnv()
	s := startListening(t, cmd, "listening")
	agent := runCmd(t, bin, "token", "agent", "--town", "t", "--rig", "r", "--agent", "a", "--data", data)
	viewer := runCmd(t, bin, "token", "viewer", "--town", "t", "--data", data)
	for i := range 20 {
		postEvent(t, s.base, agent, fmt.Sprintf(`{"type":"step","data":{"n":%d}}`, i))
	}
	last := postEvent(t, s.base, agent, `{"type":"agent.exited","data":{"reason":"completed","exit_code":0}}`)[0]
	var page struct {
		Events []wireEvent
		Gap    *struct {
			After   int64 `json:"after"`
			FirstID int64 `json:"first_id"`
		}
	}
	waitFor(t, "retention to prune all but the newest 5", func() bool {
		req, _ := http.NewRequest("GET", s.base+"/api/rigs/r/agents/a/events?after_id=1", nil)
		req.Header.Set("Authorization", "Bearer "+viewer)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		page.Gap, page.Events = nil, nil
		json.NewDecoder(resp.Body).Decode(&page)
		return page.Gap != nil && len(page.Events) == 5
	})
	if page.Gap.After != 1 || len(page.Events) != 5 || page.Gap.FirstID != page.Events[0].ID || page.Events[4].ID != last {
		t.Fatalf("page after 1: gap %+v, %d events", page.Gap, len(page.Events))
	}
	tail := exec.Command(bin, "tail", "--town", "t", "--agent", "a", "--server", s.base, "--after", "1", "--json", "--data", data)
	tail.Env = cleanEnv()
	var out, errOut bytes.Buffer
	tail.Stdout, tail.Stderr = &out, &errOut
	if err := tail.Run(); err != nil {
		t.Fatalf("tail: %v (%s)", err, errOut.String())
	}
	want := fmt.Sprintf("warning: events after id 1 were deleted by retention before they were read; going on from id %d", page.Gap.FirstID)
	if !strings.Contains(errOut.String(), want) {
		t.Fatalf("tail's stderr %q does not warn of the gap", errOut.String())
	}
	if n := strings.Count(out.String(), "\n"); n != 5 {
		t.Fatalf("tail printed %d events, want the 5 held", n)
	}
}

// waitFor polls cond until it holds, failing the test after 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSecretFile: instances that share a database share a signing secret
// through --secret-file: token mints with it without any data directory,
// and a server started with it accepts the token. A short file, or the
// secret given twice, is refused.
func TestSecretFile(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, []byte(strings.Repeat("f", 40)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cwd := t.TempDir()
	tok := exec.Command(bin, "token", "viewer", "--town", "t", "--secret-file", secret)
	tok.Env, tok.Dir = cleanEnv(), cwd
	out, err := tok.Output()
	if err != nil {
		t.Fatalf("token --secret-file: %v", err)
	}
	if entries, _ := os.ReadDir(cwd); len(entries) != 0 {
		t.Fatalf("token --secret-file made %v", entries)
	}
	cmd := exec.Command(bin, "serve", "--addr", "127.0.0.1:0", "--data", filepath.Join(dir, "data"), "--secret-file", secret, "--log-format", "json")
	cmd.Env = cleanEnv()
	s := startListening(t, cmd, "listening")
	req, _ := http.NewRequest("GET", s.base+"/api/towns/t/agents", nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(out)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("a token of the shared secret: %v %v", resp, err)
	}
	resp.Body.Close()

	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("abc"), 0o600)
	var errOut bytes.Buffer
	if code := run([]string{"token", "viewer", "--town", "t", "--secret-file", short}, io.Discard, &errOut); code != 1 || !strings.Contains(errOut.String(), "--secret-file") {
		t.Fatalf("a short secret file: exit %d, %q", code, errOut.String())
	}
	t.Setenv("AGENTSTREAM_SECRET", strings.Repeat("e", 32))
	errOut.Reset()
	if code := run([]string{"token", "viewer", "--town", "t", "--secret-file", secret}, io.Discard, &errOut); code != 2 {
		t.Fatalf("secret twice: exit %d, %q", code, errOut.String())
	}
}

// TestTailTown: tail with --town and no --agent follows every agent of the
// town in one stream, one line per event prefixed by the agent, and goes on
// past an agent's exit until it is interrupted (then it exits 0). --rig and
// --types narrow it.
func TestTailTown(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, bin, data)
	a := runCmd(t, bin, "token", "agent", "--town", "t", "--rig", "r", "--agent", "a", "--data", data)
	b := runCmd(t, bin, "token", "agent", "--town", "t", "--rig", "r2", "--agent", "b", "--data", data)
	postEvent(t, s.base, a, `{"type":"step"}`)
	postEventTo(t, s.base, "r2", b, `{"type":"step"}`)
	postEvent(t, s.base, a, `{"type":"agent.exited","data":{"reason":"completed","exit_code":0}}`)
	postEventTo(t, s.base, "r2", b, `{"type":"tool.call"}`)

	follow := func(args ...string) *tailLines {
		return startTailLines(t, bin, append([]string{"--town", "t", "--server", s.base, "--data", data}, args...)...)
	}

	tail := follow()
	var got []string
	for range 4 {
		f := strings.Split(tail.next(), "\t")
		got = append(got, f[0]+" "+f[3])
	}
	postEventTo(t, s.base, "r2", b, `{"type":"step"}`) // after a's exit: the town goes on
	f := strings.Split(tail.next(), "\t")
	got = append(got, f[0]+" "+f[3])
	want := []string{"a step", "b step", "a agent.exited", "b tool.call", "b step"}
	if !slices.Equal(got, want) {
		t.Fatalf("tail --town printed %q, want %q", got, want)
	}
	tail.interrupt()

	tail = follow("--rig", "r2", "--types", "step", "--json")
	for range 2 {
		var ev wireEvent
		if err := json.Unmarshal([]byte(tail.next()), &ev); err != nil || ev.AgentID != "b" || ev.Type != "step" {
			t.Fatalf("tail --rig r2 --types step printed %+v (%v)", ev, err)
		}
	}
	tail.interrupt()
}

// TestNoSilentSecret: only serve makes a data directory and a secret.
// token, tail, run and emit, pointed at a directory with none (a mistyped
// --data), fail, name the secret's path, and create nothing.
func TestNoSilentSecret(t *testing.T) {
	t.Setenv("AGENTSTREAM_SECRET", "")
	missing := filepath.Join(t.TempDir(), "mistyped", "data")
	for _, args := range [][]string{
		{"token", "viewer", "--town", "t", "--data", missing},
		{"token", "agent", "--town", "t", "--rig", "r", "--agent", "a", "--data", missing},
		{"tail", "--town", "t", "--agent", "a", "--server", "http://127.0.0.1:1", "--data", missing},
		{"run", "--town", "t", "--rig", "r", "--agent", "a", "--server", "http://127.0.0.1:1", "--data", missing, "--", "true"},
		{"emit", "--town", "t", "--rig", "r", "--agent", "a", "--server", "http://127.0.0.1:1", "--data", missing},
	} {
		var out, errOut bytes.Buffer
		code := run(args, &out, &errOut)
		if code != 1 || !strings.Contains(errOut.String(), filepath.Join(missing, "secret")) || out.Len() > 0 {
			t.Errorf("%v with no secret in --data: exit %d, stdout %q, stderr %q; want 1 and the secret's path", args, code, out.String(), errOut.String())
		}
		if _, err := os.Stat(filepath.Dir(missing)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%v created %s", args, filepath.Dir(missing))
		}
	}
}

// TestTokenChecksIDs: token refuses ids no endpoint would accept, naming
// the flag, and mints nothing.
func TestTokenChecksIDs(t *testing.T) {
	t.Setenv("AGENTSTREAM_SECRET", strings.Repeat("s", 40))
	for _, tc := range []struct {
		args []string
		flag string
	}{
		{[]string{"token", "viewer", "--town", "Bad Town"}, "--town"},
		{[]string{"token", "agent", "--town", "t", "--rig", "r/1", "--agent", "a"}, "--rig"},
		{[]string{"token", "agent", "--town", "t", "--rig", "r", "--agent", "has space"}, "--agent"},
		{[]string{"token", "agent", "--town", "t", "--rig", "r", "--agent", strings.Repeat("a", 129)}, "--agent"},
	} {
		var out, errOut bytes.Buffer
		if code := run(tc.args, &out, &errOut); code != 2 || out.Len() > 0 || !strings.Contains(errOut.String(), "agentstream: "+tc.flag+": ") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want 2 naming %s", tc.args, code, out.String(), errOut.String(), tc.flag)
		}
	}
}

// TestHelpAndVersion: every command's -h shows its synopsis; token's help
// shows both kinds, and a viewer's has no agent flags; run's shows the
// "-- COMMAND" form. version and --version print the build's version, and
// the VCS revision it was built from where git knows it.
func TestHelpAndVersion(t *testing.T) {
	help := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if code := run(args, &out, &errOut); code != 0 {
			t.Fatalf("%v: exit %d (%s)", args, code, errOut.String())
		}
		return out.String() + errOut.String()
	}
	for cmd, want := range map[string]string{
		"serve": "Usage: agentstream serve [flags]", "container": "Usage: agentstream container [flags]",
		"tail": "Usage: agentstream tail --town T", "emit": "Usage: agentstream emit --rig R --agent A",
		"run": "[flags] -- COMMAND [ARG...]",
	} {
		if h := help(cmd, "-h"); !strings.Contains(h, want) {
			t.Errorf("%s -h: %q lacks %q", cmd, h, want)
		}
	}
	both := help("token", "--help")
	if !strings.Contains(both, "token agent --town T --rig R --agent A") || !strings.Contains(both, "token viewer --town T") {
		t.Errorf("token --help does not show both kinds: %q", both)
	}
	if viewer := help("token", "viewer", "--help"); strings.Contains(viewer, "-agent") || strings.Contains(viewer, "-rig") {
		t.Errorf("token viewer --help shows agent flags: %q", viewer)
	}

	bin := buildBinary(t)
	want := "agentstream "
	if bi, err := exec.Command("go", "version", "-m", bin).Output(); err == nil && strings.Contains(string(bi), "vcs.revision=") {
		// Stamped: the revision must be the checkout's.
		rev, err := exec.Command("git", "rev-parse", "HEAD").Output()
		if err != nil {
			t.Fatal(err)
		}
		want = "revision " + strings.TrimSpace(string(rev))
	}
	for _, arg := range []string{"version", "--version"} {
		out := runCmd(t, bin, arg)
		if !strings.HasPrefix(out, "agentstream ") || !strings.Contains(out, want) || !strings.Contains(out, "go1.") {
			t.Errorf("agentstream %s: %q, want the version, %q and the Go version", arg, out, want)
		}
	}
}

// TestTailSaysItWaits: tail of an agent with no events yet says so, once,
// on stderr, then prints the agent's first event when it comes.
func TestTailSaysItWaits(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, bin, data)
	agent := runCmd(t, bin, "token", "agent", "--town", "t", "--rig", "r", "--agent", "a", "--data", data)
	cmd := exec.Command(bin, "tail", "--town", "t", "--agent", "a", "--server", s.base, "--data", data, "--json")
	cmd.Env = cleanEnv()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	errLine := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		if sc.Scan() {
			errLine <- sc.Text()
		}
	}()
	select {
	case l := <-errLine:
		if l != "agentstream: a of town t has no events yet; waiting for its first" {
			t.Fatalf("tail's stderr: %q", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("tail said nothing for 30 s about the agent with no events")
	}
	id := postEvent(t, s.base, agent, `{"type":"step"}`)[0]
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			line <- sc.Text()
		}
	}()
	select {
	case l := <-line:
		var ev wireEvent
		if err := json.Unmarshal([]byte(l), &ev); err != nil || ev.ID != id {
			t.Fatalf("tail printed %q, want event %d", l, id)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("tail printed nothing for 30 s after the first event")
	}
}
