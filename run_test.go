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
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// tailProc runs `agentstream tail --json` of one agent and collects what it
// prints until it exits.
type tailProc struct {
	cmd  *exec.Cmd
	out  bytes.Buffer
	err  bytes.Buffer
	done chan error
}

func startTail(t *testing.T, bin, base, town, agent, data string) *tailProc {
	t.Helper()
	tp := &tailProc{done: make(chan error, 1)}
	tp.cmd = exec.Command(bin, "tail", "--town", town, "--agent", agent, "--server", base, "--json", "--data", data)
	tp.cmd.Env = cleanEnv()
	tp.cmd.Stdout, tp.cmd.Stderr = &tp.out, &tp.err
	if err := tp.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { tp.done <- tp.cmd.Wait() }()
	t.Cleanup(func() { tp.cmd.Process.Kill() })
	return tp
}

// events waits for tail to exit 0 (it does after agent.exited) and returns
// the events it printed, checking that ids only grow.
func (tp *tailProc) events(t *testing.T) []wireEvent {
	t.Helper()
	select {
	case err := <-tp.done:
		if err != nil {
			t.Fatalf("tail: %v; stderr: %s", err, tp.err.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("tail did not end within 60 s; stderr: %s", tp.err.String())
	}
	var evs []wireEvent
	sc := bufio.NewScanner(&tp.out)
	for sc.Scan() {
		var ev wireEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("tail printed %q: %v", sc.Text(), err)
		}
		if len(evs) > 0 && ev.ID <= evs[len(evs)-1].ID {
			t.Fatalf("tail: id %d after %d", ev.ID, evs[len(evs)-1].ID)
		}
		evs = append(evs, ev)
	}
	return evs
}

// TestRunAndTail: `agentstream run -- sh -c ...` posts a command's output as
// an agent's events and exits with the command's status; a tail of that
// agent prints the same events, agent.exited last, and exits 0.
func TestRunAndTail(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, bin, data)
	const lines = 1500 // under the default retention of 2000
	script := `echo '{"type":"session.started","data":{"model":"m"}}'
echo 'oops' >&2
i=0; while [ $i -lt ` + fmt.Sprint(lines) + ` ]; do echo "line $i"; i=$((i+1)); done
echo '{"type":"tool.call","name":"ls"}'
exit 3`
	tail := startTail(t, bin, s.base, "t", "a", data)

	cmd := exec.Command(bin, "run", "--town", "t", "--rig", "r", "--agent", "a", "--server", s.base, "--data", data, "--", "sh", "-c", script)
	cmd.Env = cleanEnv()
	var runOut, runErr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &runOut, &runErr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("run: %v, want the command's exit status 3; stderr: %s", err, runErr.String())
	}
	if !strings.Contains(runOut.String(), "line 1499\n") || runErr.String() != "oops\n" {
		t.Fatalf("run did not pass the command's output through: %d bytes out, stderr %q", runOut.Len(), runErr.String())
	}

	got := tail.events(t)
	var stdout []string
	stderrLines := 0
	for _, ev := range got {
		if ev.Type == "output.line" && strings.Contains(string(ev.Data), `"stream":"stderr"`) {
			stderrLines++ // its place among stdout's lines is up to the scheduler
			continue
		}
		stdout = append(stdout, ev.Type+" "+string(ev.Data))
	}
	want := []string{`session.started {"model":"m"}`}
	for i := range lines {
		want = append(want, fmt.Sprintf(`output.line {"stream":"stdout","line":"line %d"}`, i))
	}
	want = append(want, `tool.call {"type":"tool.call","name":"ls"}`, `agent.exited {"reason":"failed","exit_code":3}`)
	if stderrLines != 1 || strings.Join(stdout, "\n") != strings.Join(want, "\n") {
		t.Fatalf("tail saw %d events (%d on stderr), want %d", len(got), stderrLines, len(want)+1)
	}
	// What tail printed is what the server holds.
	viewer := runCmd(t, bin, "token", "viewer", "--town", "t", "--data", data)
	var stored []wireEvent
	for after := int64(0); ; {
		req, _ := http.NewRequest("GET", fmt.Sprintf("%s/api/rigs/r/agents/a/events?after_id=%d&limit=1000", s.base, after), nil)
		req.Header.Set("Authorization", "Bearer "+viewer)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var page struct{ Events []wireEvent }
		json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if len(page.Events) == 0 {
			break
		}
		stored = append(stored, page.Events...)
		after = page.Events[len(page.Events)-1].ID
	}
	if len(stored) != len(got) {
		t.Fatalf("server holds %d events, tail printed %d", len(stored), len(got))
	}
	for i := range stored {
		if stored[i].ID != got[i].ID || string(stored[i].Data) != string(got[i].Data) {
			t.Fatalf("event %d: server holds %+v, tail printed %+v", i, stored[i], got[i])
		}
	}
	// Fast output went in batches, not a request per line.
	if n := ingestRequests(t, s.base); n >= lines/4 {
		t.Fatalf("%v ingest requests for %d lines", n, lines)
	}
}

// ingestRequests reads the server's count of accepted ingest requests.
func ingestRequests(t *testing.T, base string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "agentstream_http_request_duration_seconds_count{") && strings.Contains(line, "agent-events") && strings.Contains(line, `code="201"`) {
			var n float64
			fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &n)
			return n
		}
	}
	t.Fatal("no ingest request count in /metrics")
	return 0
}

// startContainer runs `agentstream container` with secret, and returns it
// and the environment that holds the secret, for serve --upstream.
func startContainer(t *testing.T, bin, secret string) (*serveProc, []string) {
	t.Helper()
	env := append(cleanEnv(), "AGENTSTREAM_CONTAINER_SECRET="+secret)
	cc := exec.Command(bin, "container", "--addr", "127.0.0.1:0", "--log-format", "json")
	cc.Env = env
	return startListening(t, cc, "container listening"), env
}

// startAgent runs a testdata/container script as agent id in the container.
func startAgent(t *testing.T, c *serveProc, secret, id, script string, args ...string) {
	t.Helper()
	path, err := filepath.Abs(filepath.Join("testdata", "container", script))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(map[string]any{"agent_id": id, "command": append([]string{"sh", path}, args...)})
	req, _ := http.NewRequest("POST", c.base+"/agents", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+secret)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("start agent %s: %d", id, resp.StatusCode)
	}
}

// TestContainerAndUpstreamCommands: `agentstream container`, `agentstream
// serve --upstream` and `agentstream tail`, as separate processes: an agent
// started in the container reaches tail through the relay, in order, and
// tail ends with its agent.exited.
func TestContainerAndUpstreamCommands(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	const secret = "cli-test-container-secret-0123456789abcdef"
	c, env := startContainer(t, bin, secret)
	sc := exec.Command(bin, "serve", "--addr", "127.0.0.1:0", "--data", data, "--log-format", "json",
		"--upstream", c.base, "--upstream-town", "t", "--upstream-rig", "r", "--poll-interval", "100ms")
	sc.Env = env
	s := startListening(t, sc, "listening")

	tail := startTail(t, bin, s.base, "t", "a1", data)
	startAgent(t, c, secret, "a1", "session.sh", "3")

	got := tail.events(t)
	var types []string
	for _, ev := range got {
		if !strings.Contains(string(ev.Data), `"stream":"stderr"`) { // stderr may come anywhere
			types = append(types, ev.Type)
		}
	}
	last := got[len(got)-1]
	want := "session.started output.line tool.call output.line output.line env agent.exited"
	if len(got) != 8 || strings.Join(types, " ") != want || string(last.Data) != `{"reason":"failed","exit_code":3}` {
		t.Fatalf("tail saw %d events: %v, last %s; want stdout's %s and a stderr line", len(got), types, last.Data, want)
	}
	// The agent never saw the container's secret.
	for _, ev := range got {
		if ev.Type == "env" && !strings.Contains(string(ev.Data), `"secret":""`) {
			t.Fatalf("the container's secret reached the agent: %s", ev.Data)
		}
	}
}

// TestUpstreamSurvivesKill9: serve --upstream is killed with SIGKILL while
// an agent writes, and started again on the same address and data; tail
// rides through it, and every event is stored once, in order.
func TestUpstreamSurvivesKill9(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	const secret = "kill9-test-container-secret-0123456789abcdef"
	c, env := startContainer(t, bin, secret)
	serve := func(addr string) *serveProc {
		sc := exec.Command(bin, "serve", "--addr", addr, "--data", data, "--log-format", "json",
			"--upstream", c.base, "--upstream-town", "t", "--upstream-rig", "r", "--poll-interval", "100ms", "--upstream-busy-interval", "20ms")
		sc.Env = env
		return startListening(t, sc, "listening")
	}
	s := serve("127.0.0.1:0")
	tail := startTail(t, bin, s.base, "t", "a", data)
	const n = 200
	startAgent(t, c, secret, "a", "paced.sh", fmt.Sprint(n), "0.01")

	// Kill it once events are flowing, whatever it is doing.
	viewer := runCmd(t, bin, "token", "viewer", "--town", "t", "--data", data)
	deadline := time.Now().Add(30 * time.Second)
	for len(readEvents(t, s.base, viewer)) < 30 {
		if time.Now().After(deadline) {
			t.Fatal("no events relayed within 30 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := s.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-s.done
	serve(strings.TrimPrefix(s.base, "http://"))

	got := tail.events(t)
	var lines []string
	for _, ev := range got {
		lines = append(lines, ev.Type+" "+string(ev.Data))
	}
	var want []string
	for i := 1; i <= n; i++ {
		want = append(want, fmt.Sprintf(`step {"n":%d}`, i))
		if i%10 == 0 {
			want = append(want, fmt.Sprintf(`output.line {"stream":"stdout","line":"done %d"}`, i))
		}
	}
	want = append(want, `agent.exited {"reason":"completed","exit_code":0}`)
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("tail saw %d events, want %d, each once and in order", len(lines), len(want))
	}
}

// TestEmitCommand: `agentstream emit < lines` posts each line by the line
// rules; a tail of the agent sees them, ending with the agent.exited the
// input carries.
func TestEmitCommand(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, bin, data)
	tail := startTail(t, bin, s.base, "t", "e", data)
	cmd := exec.Command(bin, "emit", "--town", "t", "--rig", "r", "--agent", "e", "--server", s.base, "--data", data)
	cmd.Env = cleanEnv()
	cmd.Stdin = strings.NewReader(`{"type":"step","data":{"n":1}}
a plain line
{"type":"agent.exited","data":{"reason":"completed","exit_code":0}}
`)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("emit: %v: %s", err, out)
	}
	var got []string
	for _, ev := range tail.events(t) {
		got = append(got, ev.Type+" "+string(ev.Data))
	}
	want := []string{`step {"n":1}`, `output.line {"stream":"stdout","line":"a plain line"}`, `agent.exited {"reason":"completed","exit_code":0}`}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("tail saw %q", got)
	}
}

// TestInterruptStopsRetrying: with the server unreachable, run and emit
// retry their posts; the first Ctrl-C (SIGINT) stops that at once. Each
// exits 130, saying how many events were not delivered, and run first
// hands the signal to its command, which gets to act on it.
func TestInterruptStopsRetrying(t *testing.T) {
	bin := buildBinary(t)
	for _, tc := range []struct {
		name   string
		args   []string
		stdin  bool   // emit reads a line from its stdin, held open
		stdout string // what the command printed, for run
		lost   string // a regular expression
	}{
		{"emit", []string{"emit"}, true, "", `interrupted: 1 event of a not delivered`},
		// agent.started and agent.exited at least; whether the command's
		// lines were read before the interrupt stopped the posts is timing.
		{"run", []string{"run", "--", "sh", "-c", `trap "echo got INT; exit 3" INT; echo started; while :; do sleep 0.05; done`},
			false, "started\ngot INT\n", `interrupted: [2-4] events of a not delivered`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{tc.args[0], "--server", "http://127.0.0.1:1", "--token", "x.y.z", "--rig", "r", "--agent", "a"}, tc.args[1:]...)
			cmd := exec.Command(bin, args...)
			cmd.Env = cleanEnv()
			var stdout bytes.Buffer
			cmd.Stdout = &stdout
			stderr, err := cmd.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if tc.stdin {
				in, err := cmd.StdinPipe()
				if err != nil {
					t.Fatal(err)
				}
				defer in.Close()
				fmt.Fprintln(in, `{"type":"step"}`)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill() })
			var errText strings.Builder
			sc := bufio.NewScanner(stderr)
			for !strings.Contains(errText.String(), "retrying") {
				if !sc.Scan() {
					t.Fatalf("%s ended before retrying; stderr: %s", tc.name, errText.String())
				}
				errText.WriteString(sc.Text() + "\n")
			}
			if err := cmd.Process.Signal(os.Interrupt); err != nil {
				t.Fatal(err)
			}
			rest := make(chan string, 1)
			go func() {
				var b strings.Builder
				for sc.Scan() {
					b.WriteString(sc.Text() + "\n")
				}
				rest <- b.String()
			}()
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("%s still running 10 s after Ctrl-C", tc.name)
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 130 {
				t.Fatalf("%s after Ctrl-C: %v, want exit status 130", tc.name, err)
			}
			if msg := <-rest; !regexp.MustCompile(tc.lost).MatchString(msg) {
				t.Fatalf("%s's stderr %q does not say %q", tc.name, msg, tc.lost)
			}
			if tc.stdout != "" && stdout.String() != tc.stdout {
				t.Fatalf("the command printed %q, want %q (the signal handed on)", stdout.String(), tc.stdout)
			}
		})
	}
}
