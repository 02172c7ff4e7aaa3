package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model/pgtest"
	"github.com/agentstream/agentstream/server"
)

// TestPostgresRestart: serve on PostgreSQL, a poster posting keyed events
// and tail following the agent, all real processes; PostgreSQL is stopped
// mid-run and started again. While it is down ingest answers 503 with
// Retry-After (never 201) and /readyz 503; afterwards posting goes on, and
// tail has every acknowledged event exactly once, in order, as the
// database does.
func TestPostgresRestart(t *testing.T) {
	cluster, dsn := startCluster(t)
	bin := buildBinary(t)
	secret := strings.Repeat("p", 40)
	env := append(cleanEnv(), "AGENTSTREAM_SECRET="+secret)
	cmd := exec.Command(bin, "serve", "--addr", "127.0.0.1:0", "--data", t.TempDir(), "--db", dsn, "--log-format", "json")
	cmd.Env = env
	s := startListening(t, cmd, "listening")
	auth, _ := server.NewAuth([]byte(secret))
	agent, _ := auth.MintAgent("t", "r", "a", time.Hour)
	viewer, _ := auth.MintViewer("t", time.Hour)

	seen := followIDs(t, bin, s.base, viewer, env)

	// post sends one keyed event until it is acknowledged.
	post := func(i int) int64 {
		body := fmt.Sprintf(`{"type":"step","data":{"i":%d}}`, i)
		for {
			req, _ := http.NewRequest("POST", s.base+"/api/rigs/r/agent-events", strings.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+agent)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Idempotency-Key", fmt.Sprint("step-", i))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("post %d: %v", i, err)
			}
			var v struct{ IDs []int64 }
			json.NewDecoder(resp.Body).Decode(&v)
			resp.Body.Close()
			if resp.StatusCode == 201 {
				return v.IDs[0]
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	var acked []int64
	for i := range 20 {
		acked = append(acked, post(i))
	}

	cluster.Down()
	code, ra := 0, ""
	req, _ := http.NewRequest("POST", s.base+"/api/rigs/r/agent-events", strings.NewReader(`{"type":"step"}`))
	req.Header.Set("Authorization", "Bearer "+agent)
	req.Header.Set("Content-Type", "application/json")
	if resp, err := http.DefaultClient.Do(req); err == nil {
		code, ra = resp.StatusCode, resp.Header.Get("Retry-After")
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if code != 503 || ra == "" {
		t.Fatalf("ingest while PostgreSQL is down: %d, Retry-After %q; want 503 with Retry-After", code, ra)
	}
	if resp, err := http.Get(s.base + "/readyz"); err != nil || resp.StatusCode != 503 {
		t.Fatalf("readyz while PostgreSQL is down: %v %v", resp, err)
	}
	if err := cluster.Up(); err != nil {
		t.Fatal(err)
	}
	for i := 20; i < 40; i++ {
		acked = append(acked, post(i))
	}
	var got []int64
	for len(got) < len(acked) {
		select {
		case id := <-seen:
			got = append(got, id)
		case <-time.After(60 * time.Second):
			t.Fatalf("tail saw %d of %d acknowledged events: %v", len(got), len(acked), got)
		}
	}
	if !slices.Equal(got, acked) {
		t.Fatalf("tail saw %v,\nacknowledged %v", got, acked)
	}
	var page struct{ Events []struct{ ID int64 } }
	req, _ = http.NewRequest("GET", s.base+"/api/rigs/r/agents/a/events?limit=1000", nil)
	req.Header.Set("Authorization", "Bearer "+viewer)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&page)
	resp.Body.Close()
	// The one unkeyed post made while PostgreSQL was down was refused; the
	// database holds the acknowledged events and nothing else.
	if len(page.Events) != len(acked) {
		t.Fatalf("the database holds %d events; %d were acknowledged", len(page.Events), len(acked))
	}
}

// failoverProxy forwards each new connection to the first of its targets
// that accepts one: a load balancer in its simplest form.
type failoverProxy struct {
	ln      net.Listener
	targets []string
}

func newFailoverProxy(t *testing.T, targets ...string) *failoverProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &failoverProxy{ln: ln, targets: targets}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.forward(c)
		}
	}()
	return p
}

func (p *failoverProxy) forward(c net.Conn) {
	defer c.Close()
	for _, target := range p.targets {
		s, err := net.Dial("tcp", target)
		if err != nil {
			continue
		}
		defer s.Close()
		go func() { io.Copy(s, c); s.Close() }()
		io.Copy(c, s)
		return
	}
}

// TestInstanceKilled: two serve processes on one PostgreSQL database
// behind a load balancer; tail follows an agent through it while events
// are posted to the second instance. The first is killed with SIGKILL
// mid-stream: tail reconnects, lands on the second, and has every
// acknowledged event exactly once, in order.
func TestInstanceKilled(t *testing.T) {
	_, dsn := startCluster(t)
	bin := buildBinary(t)
	secret := strings.Repeat("k", 40)
	env := append(cleanEnv(), "AGENTSTREAM_SECRET="+secret)
	var inst []*serveProc
	for range 2 {
		cmd := exec.Command(bin, "serve", "--addr", "127.0.0.1:0", "--data", t.TempDir(), "--db", dsn, "--log-format", "json")
		cmd.Env = env
		inst = append(inst, startListening(t, cmd, "listening"))
	}
	lb := newFailoverProxy(t, strings.TrimPrefix(inst[0].base, "http://"), strings.TrimPrefix(inst[1].base, "http://"))
	auth, _ := server.NewAuth([]byte(secret))
	agent, _ := auth.MintAgent("t", "r", "a", time.Hour)
	viewer, _ := auth.MintViewer("t", time.Hour)

	seen := followIDs(t, bin, "http://"+lb.ln.Addr().String(), viewer, env)
	var acked, got []int64
	read := func(n int) {
		for len(got) < n {
			select {
			case id := <-seen:
				got = append(got, id)
			case <-time.After(60 * time.Second):
				t.Fatalf("tail saw %d of %d acknowledged events", len(got), n)
			}
		}
	}
	for i := range 30 {
		acked = append(acked, postEvent(t, inst[1].base, agent, fmt.Sprintf(`{"type":"step","data":{"i":%d}}`, i))...)
		if i == 14 {
			read(len(acked)) // the first half, through the first instance
			inst[0].cmd.Process.Kill()
			<-inst[0].done
		}
	}
	read(len(acked))
	if !slices.Equal(got, acked) {
		t.Fatalf("tail saw %v,\nacknowledged %v", got, acked)
	}
}

// startCluster starts a PostgreSQL cluster of the test's own (it restarts
// it, or wants no other test's load on it) and returns it with a fresh
// database's URL. Without PostgreSQL the test skips, or fails in CI.
func startCluster(t *testing.T) (*pgtest.Cluster, string) {
	t.Helper()
	cluster, err := pgtest.Start()
	if err != nil {
		if fail, msg := pgtest.Skip(err); fail {
			t.Fatal(msg)
		} else {
			t.Skip(msg)
		}
	}
	t.Cleanup(cluster.Stop)
	dsn, err := cluster.NewDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return cluster, dsn
}

// followIDs runs tail on agent a of town t at base and sends the id of
// every event it prints.
func followIDs(t *testing.T, bin, base, viewer string, env []string) <-chan int64 {
	t.Helper()
	tail := exec.Command(bin, "tail", "--town", "t", "--agent", "a", "--server", base, "--json", "--token", viewer)
	tail.Env = env
	out, _ := tail.StdoutPipe()
	if err := tail.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tail.Process.Kill(); tail.Wait() })
	seen := make(chan int64, 1000)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev struct{ ID int64 }
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				seen <- ev.ID
			}
		}
	}()
	return seen
}
