package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

const relaySecret = "loadtest-container-secret-0123456789abcdef"

// emit is the agent of the relay scenarios: it writes n events to stdout at
// rate per second (0: as fast as it can), each carrying its sequence number
// and the time it was written.
func emit(n, rate int) {
	w := bufio.NewWriterSize(os.Stdout, 64<<10)
	start := time.Now()
	for i := 1; i <= n; i++ {
		if rate > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i-1) / float64(rate) * float64(time.Second)))); d > 0 {
				w.Flush()
				time.Sleep(d)
			}
		}
		fmt.Fprintf(w, `{"type":"load.tick","data":{"seq":%d,"t":%d}}`+"\n", i, time.Now().UnixNano())
	}
	w.Flush()
}

// relayResult is what one relay scenario measured.
type relayResult struct {
	n, delivered, lost, dup, gaps int
	p50, p99                      time.Duration
	elapsed                       time.Duration // first event written to last one delivered
	serveCPU, containerCPU        float64
}

// runRelay measures one agent's events through `agentstream container` and
// `agentstream serve --upstream` to an SSE client: n events at rate per
// second, pulled every interval, busy agents every busy.
func runRelay(bin string, n, rate int, interval, busy time.Duration) relayResult {
	dir, err := os.MkdirTemp("", "agentstream-relay-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	env := append(os.Environ(), "AGENTSTREAM_CONTAINER_SECRET="+relaySecret)
	caddr, saddr := freeAddr(), freeAddr()
	ctr := &server{cmd: exec.Command(bin, "container", "--addr", caddr), base: "http://" + caddr}
	ctr.cmd.Env = env
	data := filepath.Join(dir, "data")
	srv := &server{cmd: exec.Command(bin, "serve", "--addr", saddr, "--data", data,
		"--upstream", ctr.base, "--upstream-town", "load", "--upstream-rig", "r",
		"--poll-interval", interval.String(), "--upstream-busy-interval", busy.String()), base: "http://" + saddr}
	srv.cmd.Env = env
	for _, s := range []*server{ctr, srv} {
		s.cmd.Stderr = io.Discard
		if err := s.cmd.Start(); err != nil {
			log.Fatal(err)
		}
		waitHealthy(s.base)
	}
	defer func() {
		for _, s := range []*server{srv, ctr} {
			s.cmd.Process.Signal(syscall.SIGTERM)
			s.cmd.Wait()
		}
	}()
	out, err := exec.Command(bin, "token", "viewer", "--town", "load", "--data", data).Output()
	if err != nil {
		log.Fatalf("token: %v", err)
	}
	viewer := strings.TrimSpace(string(out))

	// The stream opens before the agent starts: it waits for it.
	conn, err := net.Dial("tcp", saddr)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /api/towns/load/container/agents/a/stream HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nAccept: text/event-stream\r\n\r\n", saddr, viewer)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil || resp.StatusCode != 200 {
		log.Fatalf("stream: %v %v", resp, err)
	}

	self, _ := os.Executable()
	body, _ := json.Marshal(map[string]any{"agent_id": "a", "command": []string{self, "-emit", fmt.Sprint(n), "-emit-rate", fmt.Sprint(rate)}})
	req, _ := http.NewRequest("POST", ctr.base+"/agents", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+relaySecret)
	req.Header.Set("Content-Type", "application/json")
	cpu0, ccpu0 := srv.cpu(), ctr.cpu()
	start := time.Now()
	if r, err := http.DefaultClient.Do(req); err != nil || r.StatusCode != 201 {
		log.Fatalf("start agent: %v %v", r, err)
	}

	res := relayResult{n: n}
	seen := map[int]int{}
	var lat []time.Duration
	var last time.Time
	conn.SetReadDeadline(time.Now().Add(time.Duration(float64(n)/float64(max(rate, 1000))*float64(time.Second)) + time.Minute))
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		d, ok := bytes.CutPrefix(sc.Bytes(), []byte("data: "))
		if !ok {
			continue
		}
		if bytes.Contains(d, []byte(`"type":"upstream.gap"`)) {
			res.gaps++
			continue
		}
		if bytes.Contains(d, []byte(`"type":"agent.exited"`)) {
			break
		}
		seq, ok1 := intAfter(d, `"seq":`)
		t, ok2 := intAfter(d, `"t":`)
		if !ok1 || !ok2 {
			continue
		}
		now := time.Now()
		if seen[int(seq)]++; seen[int(seq)] == 1 {
			lat = append(lat, time.Duration(now.UnixNano()-t))
		}
		last = now
	}
	res.serveCPU, res.containerCPU = srv.cpu()-cpu0, ctr.cpu()-ccpu0
	res.elapsed = last.Sub(start)
	for seq := 1; seq <= n; seq++ {
		switch c := seen[seq]; {
		case c == 0:
			res.lost++
		case c > 1:
			res.dup += c - 1
		}
	}
	res.delivered = len(lat)
	slices.Sort(lat)
	if len(lat) > 0 {
		res.p50, res.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	}
	return res
}

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func waitHealthy(base string) {
	for i := 0; ; i++ {
		if resp, err := http.Get(base + "/healthz"); err == nil {
			resp.Body.Close()
			return
		}
		if i == 200 {
			log.Fatalf("%s did not come up", base)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// relayScenarios prints the relay's lag at a steady rate and how fast one
// agent can write before the container's ring wraps, with busy pulls off
// (every interval) and on.
func relayScenarios(bin string, duration time.Duration, only string) {
	fmt.Printf("%-22s %6s %6s %9s %6s %5s %5s %9s %9s %10s %12s\n",
		"relay", "ev/s", "events", "delivered", "lost", "dup", "gaps", "p50", "p99", "stored/s", "cpu-ms/1k")
	const interval = 500 * time.Millisecond
	for _, sc := range []struct {
		rate int
		busy time.Duration
	}{
		{20, interval}, {20, 100 * time.Millisecond},
		{1000, interval}, {1000, 100 * time.Millisecond},
		{2000, interval}, {2000, 100 * time.Millisecond},
		{4000, 100 * time.Millisecond},
		{8000, 100 * time.Millisecond},
		{0, interval}, {0, 100 * time.Millisecond},
	} {
		name := fmt.Sprintf("relay/%d/busy=%s", sc.rate, sc.busy)
		if only != "" && !strings.Contains(name, only) {
			continue
		}
		n := int(duration.Seconds() * float64(sc.rate))
		if sc.rate == 0 {
			n = 20000 // as fast as the agent can write
		}
		r := runRelay(bin, n, sc.rate, interval, sc.busy)
		rate := fmt.Sprint(sc.rate)
		if sc.rate == 0 {
			rate = "max"
		}
		fmt.Printf("%-22s %6s %6d %9d %6d %5d %5d %9s %9s %10.0f %12.1f\n",
			fmt.Sprintf("busy %s", sc.busy), rate, r.n, r.delivered, r.lost, r.dup, r.gaps,
			r.p50.Round(100*time.Microsecond), r.p99.Round(100*time.Microsecond),
			float64(r.delivered)/r.elapsed.Seconds(), (r.serveCPU+r.containerCPU)*1e6/float64(max(r.delivered, 1)))
	}
}
