// Command loadtest measures agentstream's stream fan-out on loopback: one
// agent, one publisher posting at a fixed rate, N subscribers on SSE or
// WebSocket. It starts the server under test as a child process, so the
// server's CPU time and memory are its own, and compares it, in the same
// run, with a naive design: r3labs/sse's own server (a goroutine and a
// channel per subscriber, each event formatted per subscriber, nothing
// stored).
//
//	go build -o /tmp/agentstream . && go run ./server/loadtest -bin /tmp/agentstream
//
// With -scaleout it measures two instances on one PostgreSQL database (a
// throwaway cluster it starts itself), subscribers split over both.
//
// With -town it measures a town's stream against its agents' streams: 50
// agents posting 10 events/s each, 200 viewers on the town's stream, or the
// same 200 spread over the 50 agents' streams.
//
// With -agents 100,1000,5000 it measures the workload agents really have:
// many agents posting a few events a second each (-agent-rate), a few
// viewers each (-agent-viewers, half SSE and half WebSocket), against the
// naive server with one stream per agent.
//
// With -metrics-cost N it measures the delivery-lag histogram's cost: the
// fan-out scenarios with `serve --delivery-histogram` on and off, N times
// each.
//
// With -membudget N it measures the server's RSS growth for N streams that
// never read, on a history of 64 KiB events.
//
// With -relay it measures instead one agent's events through `agentstream
// container` and `serve --upstream` to an SSE client: lag at a steady rate,
// and the rates at which the container's ring does or does not wrap before
// the relay reads it.
//
// Every loop is bounded: each scenario runs for -duration and ends.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"iter"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/r3labs/sse/v2"
)

func main() {
	bin := flag.String("bin", "", "agentstream binary to test (go build -o ... .)")
	naive := flag.String("naive-serve", "", "internal: run the naive r3labs/sse server on this address")
	duration := flag.Duration("duration", 10*time.Second, "publishing time per scenario")
	idle := flag.Int("idle", 5000, "connections for the idle-memory measurement")
	only := flag.String("only", "", "run only scenarios whose name contains this")
	relay := flag.Bool("relay", false, "measure the container relay (agentstream container + serve --upstream) instead of fan-out")
	emitN := flag.Int("emit", 0, "internal: be the relay scenarios' agent, writing this many events")
	emitRate := flag.Int("emit-rate", 0, "internal: events per second the agent writes (0: as fast as it can)")
	memStreams := flag.Int("membudget", 0, "measure instead the RSS cost of this many streams that never read, on 64 KiB events")
	scaleOut := flag.Bool("scaleout", false, "measure instead two instances on one PostgreSQL (started here): subscribers split over both, events posted to one")
	agents := flag.String("agents", "", "measure instead many agents with few viewers each: these agent counts (comma-separated, e.g. 100,1000,5000)")
	agentRate := flag.Float64("agent-rate", 5, "with -agents: events per second each agent posts")
	agentViewers := flag.Int("agent-viewers", 2, "with -agents: viewers per agent, half SSE and half WebSocket")
	town := flag.Bool("town", false, "measure instead 50 agents at 10 events/s each, 200 viewers on the town's stream against the same viewers spread over the agents' streams")
	metricsCostReps := flag.Int("metrics-cost", 0, "measure instead the delivery-lag histogram's cost: the fan-out scenarios with it on and off, alternating, this many times each")
	flag.Parse()
	if *naive != "" {
		serveNaive(*naive)
		return
	}
	if *emitN > 0 {
		emit(*emitN, *emitRate)
		return
	}
	if *bin == "" {
		log.Fatal("-bin is required: go build -o /tmp/agentstream . first")
	}
	raiseFDLimit()
	if *scaleOut {
		scaleOutScenarios(*bin, *duration)
		return
	}
	if *metricsCostReps > 0 {
		metricsCost(*bin, *duration, *metricsCostReps, *only)
		return
	}
	if *agents != "" {
		var counts []int
		for _, f := range strings.Split(*agents, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n <= 0 {
				log.Fatalf("-agents %q: want counts like 100,1000", *agents)
			}
			counts = append(counts, n)
		}
		agentsScenarios(*bin, counts, *agentRate, *agentViewers, *duration)
		return
	}
	if *town {
		townScenarios(*bin, 50, 10, 200, *duration)
		return
	}
	if *memStreams > 0 {
		memBudget(*bin, *memStreams, 300)
		return
	}
	if *relay {
		relayScenarios(*bin, *duration, *only)
		return
	}
	type scenario struct {
		server, transport string
		subs              int
		rate              int
	}
	var scenarios []scenario
	for _, sc := range []struct{ subs, rate int }{{1000, 200}, {5000, 10}} {
		scenarios = append(scenarios,
			scenario{"agentstream", "sse", sc.subs, sc.rate},
			scenario{"agentstream", "ws", sc.subs, sc.rate},
			scenario{"agentstream", "h2c", sc.subs, sc.rate},
			scenario{"r3labs-naive", "sse", sc.subs, sc.rate})
	}
	fmt.Printf("%-13s %-4s %6s %5s %10s %6s %5s %9s %9s %12s %14s %15s\n",
		"server", "tr", "subs", "ev/s", "delivered", "lost", "dup", "p50", "p99", "cpu-s/1M", "deliveries/cpu-s", "client cpu-s/1M")
	for _, sc := range scenarios {
		name := fmt.Sprintf("%s/%s/%dx%d", sc.server, sc.transport, sc.subs, sc.rate)
		if *only != "" && !strings.Contains(name, *only) {
			continue
		}
		srv := start(sc.server, *bin)
		r := run(srv, sc.transport, sc.subs, sc.rate, *duration)
		srv.stop()
		fmt.Printf("%-13s %-4s %6d %5d %10d %6d %5d %9s %9s %12.2f %14.0f %15.2f\n",
			sc.server, sc.transport, sc.subs, sc.rate, r.delivered, r.lost, r.dup,
			r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond),
			r.cpu/float64(r.delivered)*1e6, float64(r.delivered)/r.cpu, r.clientCPU/float64(r.delivered)*1e6)
	}
	if *idle > 0 {
		for _, c := range []struct{ server, transport string }{
			{"agentstream", "ws"}, {"agentstream", "sse"}, {"agentstream", "h2c"}, {"r3labs-naive", "sse"}} {
			if *only != "" && !strings.Contains(c.server+"/"+c.transport+"/idle", *only) {
				continue
			}
			srv := start(c.server, *bin)
			perConn := idleMemory(srv, c.transport, *idle)
			srv.stop()
			fmt.Printf("idle %-13s %-4s %d connections: %.1f KiB per connection\n", c.server, c.transport, *idle, perConn/1024)
		}
	}
}

// server is a server under test, running as a child process.
type server struct {
	cmd    *exec.Cmd
	base   string
	agent  string // agent token (agentstream) for posting
	viewer string // viewer token
	naive  bool
	dir    string
}

func start(kind, bin string) *server { return startWith(kind, bin, nil, nil) }

// startWith is start with more serve flags, and more environment for
// serve and token (a shared AGENTSTREAM_SECRET, say).
func startWith(kind, bin string, serveArgs, env []string) *server {
	dir, err := os.MkdirTemp("", "agentstream-load-")
	if err != nil {
		log.Fatal(err)
	}
	s := &server{dir: dir, naive: kind == "r3labs-naive"}
	addr := freeAddr()
	data := filepath.Join(dir, "data")
	if s.naive {
		self, _ := os.Executable()
		s.cmd = exec.Command(self, "-naive-serve", addr)
	} else {
		s.cmd = exec.Command(bin, append([]string{"serve", "--addr", addr, "--data", data, "--log-format", "json"}, serveArgs...)...)
		s.cmd.Env = append(append(os.Environ(), "GODEBUG="), env...)
	}
	s.cmd.Stderr = io.Discard
	if err := s.cmd.Start(); err != nil {
		log.Fatal(err)
	}
	s.base = "http://" + addr
	waitHealthy(s.base)
	if !s.naive {
		// Minted once serve runs: it makes the secret they are signed with.
		tok := func(args ...string) string {
			cmd := exec.Command(bin, append([]string{"token"}, append(args, "--data", data)...)...)
			cmd.Env = append(os.Environ(), env...)
			out, err := cmd.Output()
			if err != nil {
				log.Fatalf("token: %v", err)
			}
			return strings.TrimSpace(string(out))
		}
		s.agent = tok("agent", "--town", "load", "--rig", "r", "--agent", "a")
		s.viewer = tok("viewer", "--town", "load")
	}
	return s
}

func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		s.cmd.Process.Kill()
		<-done
	}
	os.RemoveAll(s.dir)
}

// cpu is the server process's user+system CPU seconds so far.
func (s *server) cpu() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // clock ticks; 100 per second on Linux
}

// selfCPU is the CPU time this process has used, in seconds: on the same
// cores as the server, what the clients cost shows in its latencies.
func selfCPU() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// rss is the server's resident memory in bytes.
func (s *server) rss() float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb * 1024
		}
	}
	return 0
}

// publish posts one event carrying its send time.
func (s *server) publish(c *http.Client, seq int) error { return s.publishAs(c, s.agent, seq) }

// publishAs is publish as the agent of token (agentstream only).
func (s *server) publishAs(c *http.Client, token string, seq int) error {
	return s.post(c, token, "a", seq)
}

// publishTo is publish to the naive server's stream.
func (s *server) publishTo(c *http.Client, stream string, seq int) error {
	return s.post(c, "", stream, seq)
}

func (s *server) post(c *http.Client, token, stream string, seq int) error {
	now := time.Now().UnixNano()
	var req *http.Request
	if s.naive {
		req, _ = http.NewRequest("POST", s.base+"/publish?stream="+stream, strings.NewReader(fmt.Sprintf(`{"seq":%d,"t":%d}`, seq, now)))
	} else {
		body := fmt.Sprintf(`{"type":"load.tick","data":{"seq":%d,"t":%d}}`, seq, now)
		req, _ = http.NewRequest("POST", s.base+"/api/rigs/r/agent-events", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("publish: %s", resp.Status)
	}
	return nil
}

func (s *server) streamPath() string {
	if s.naive {
		return "/events?stream=a"
	}
	return "/api/towns/load/container/agents/a/stream"
}

type result struct {
	delivered, lost, dup int
	p50, p99             time.Duration
	cpu                  float64
	clientCPU            float64 // this process's: subscribers and publisher
}

// subscriber counts what one client receives.
type subscriber struct {
	seen map[int]int
	lat  []time.Duration
}

// got records one event. It picks seq and t out of the bytes rather than
// decoding JSON: the load generator shares the machine with the server and
// must spend as little CPU per delivery as it can.
func (sub *subscriber) got(data []byte) {
	seq, ok1 := intAfter(data, `"seq":`)
	t, ok2 := intAfter(data, `"t":`)
	if !ok1 || !ok2 {
		return
	}
	sub.seen[int(seq)]++
	if sub.seen[int(seq)] == 1 {
		sub.lat = append(sub.lat, time.Duration(time.Now().UnixNano()-t))
	}
}

func intAfter(b []byte, key string) (int64, bool) {
	i := bytes.Index(b, []byte(key))
	if i < 0 {
		return 0, false
	}
	b = b[i+len(key):]
	n, j := int64(0), 0
	for ; j < len(b) && '0' <= b[j] && b[j] <= '9'; j++ {
		n = n*10 + int64(b[j]-'0')
	}
	return n, j > 0
}

func run(s *server, transport string, n, rate int, d time.Duration) result {
	return runOn(s, []*server{s}, transport, n, rate, d)
}

// runOn is run with the subscribers spread over several servers (round
// robin), the events posted to s, and the CPU time of them all.
func runOn(s *server, subsOn []*server, transport string, n, rate int, d time.Duration) result {
	a := listen(n, transport, func(i int) (net.Conn, io.Reader, error) { return dial(subsOn[i%len(subsOn)], transport) })
	total := int(d.Seconds() * float64(rate))
	pub := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}}
	cpuOf := func() float64 {
		var c float64
		for _, sv := range subsOn {
			c += sv.cpu()
		}
		return c
	}
	cpu0, self0 := cpuOf(), selfCPU()
	publishAll(total, rate, func(seq int) error { return s.publish(pub, seq) })
	waitQuiet(a.subs)
	cpu, self := cpuOf()-cpu0, selfCPU()-self0
	a.close()
	r := tally(a.subs, total, cpu, func(int, int) bool { return true })
	r.clientCPU = self
	return r
}

// audience is the subscribers of a scenario, each reading its stream until
// its connection is closed.
type audience struct {
	subs  []*subscriber
	conns []net.Conn
	wg    sync.WaitGroup
}

// listen opens n streams, stream i with dial(i), and returns once all are
// open and have had time to reach the live path.
func listen(n int, transport string, dial func(i int) (net.Conn, io.Reader, error)) *audience {
	return listenEach(n, func(int) string { return transport }, dial)
}

// listenEach is listen with stream i on transport transportOf(i).
func listenEach(n int, transportOf func(i int) string, dial func(i int) (net.Conn, io.Reader, error)) *audience {
	a := &audience{subs: make([]*subscriber, n), conns: make([]net.Conn, n)}
	var ready sync.WaitGroup
	for i := range a.subs {
		a.subs[i] = &subscriber{seen: map[int]int{}}
		ready.Add(1)
		a.wg.Go(func() {
			conn, r, err := dial(i)
			if err != nil {
				log.Printf("subscriber %d: %v", i, err)
				ready.Done()
				return
			}
			a.conns[i] = conn
			ready.Done()
			read(transportOf(i), r, a.subs[i])
		})
	}
	ready.Wait()
	time.Sleep(500 * time.Millisecond) // let every stream reach the live path
	return a
}

// close ends every stream and waits for its reader.
func (a *audience) close() {
	for _, c := range a.conns {
		if c != nil {
			c.Close()
		}
	}
	a.wg.Wait()
}

// publishAll posts seq 0 to total-1, rate a second, each with post on a
// goroutine of its own, and waits for them all. A failed post is logged.
func publishAll(total, rate int, post func(seq int) error) {
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	var pubs sync.WaitGroup
	for seq := range total {
		<-tick.C
		pubs.Go(func() {
			if err := post(seq); err != nil {
				log.Printf("publish %d: %v", seq, err)
			}
		})
	}
	pubs.Wait()
}

// tally counts what subscribers got of seq 0 to total-1: each should have
// got, once, every seq that wants(subscriber, seq) says.
func tally(subs []*subscriber, total int, cpu float64, wants func(sub, seq int) bool) result {
	return tallySeqs(subs, cpu, func(sub int) iter.Seq[int] {
		return func(yield func(int) bool) {
			for seq := range total {
				if wants(sub, seq) && !yield(seq) {
					return
				}
			}
		}
	})
}

// tallySeqs counts what subscribers got: each should have got, once,
// every seq of seqs(subscriber).
func tallySeqs(subs []*subscriber, cpu float64, seqs func(sub int) iter.Seq[int]) result {
	r := result{cpu: cpu}
	var lat []time.Duration
	for i, sub := range subs {
		for seq := range seqs(i) {
			switch c := sub.seen[seq]; {
			case c == 0:
				r.lost++
			case c > 1:
				r.dup += c - 1
			}
		}
		r.delivered += len(sub.lat)
		lat = append(lat, sub.lat...)
	}
	slices.Sort(lat)
	if len(lat) > 0 {
		r.p50, r.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	}
	return r
}

// waitQuiet waits for deliveries to finish: until nothing new has arrived
// for 2 s.
func waitQuiet(subs []*subscriber) {
	var last int
	for quiet := 0; quiet < 4; {
		time.Sleep(500 * time.Millisecond)
		cur := 0
		for _, sub := range subs {
			cur += len(sub.lat)
		}
		if cur == last {
			quiet++
		} else {
			quiet = 0
		}
		last = cur
	}
}

// dial opens s's stream and returns the connection and a reader positioned
// at the stream's body.
func dial(s *server, transport string) (net.Conn, io.Reader, error) {
	return dialPath(s, transport, s.streamPath())
}

// dialPath is dial for the stream at path.
func dialPath(s *server, transport, path string) (net.Conn, io.Reader, error) {
	addr := strings.TrimPrefix(s.base, "http://")
	if transport == "h2c" {
		return dialH2C(s, path)
	}
	if transport == "ws" {
		d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Authorization": {"Bearer " + s.viewer}})}
		conn, br, _, err := d.Dial(context.Background(), "ws://"+addr+path)
		if err != nil {
			return nil, nil, err
		}
		if br != nil {
			return conn, io.MultiReader(br, conn), nil
		}
		return conn, conn, nil
	}
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	auth := ""
	if s.viewer != "" {
		auth = "Authorization: Bearer " + s.viewer + "\r\n"
	}
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n%s\r\n", path, addr, auth)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	if resp.StatusCode != 200 {
		conn.Close()
		return nil, nil, fmt.Errorf("stream: %s", resp.Status)
	}
	return conn, resp.Body, nil
}

func read(transport string, r io.Reader, sub *subscriber) {
	if transport == "ws" {
		for {
			f, err := ws.ReadFrame(r)
			if err != nil || f.Header.OpCode == ws.OpClose {
				return
			}
			if f.Header.OpCode == ws.OpText {
				sub.got(f.Payload)
			}
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if d, ok := bytes.CutPrefix(sc.Bytes(), []byte("data: ")); ok {
			sub.got(d)
		}
	}
}

// idleMemory opens n idle streams and returns the server's RSS growth per
// connection.
func idleMemory(s *server, transport string, n int) float64 {
	time.Sleep(time.Second)
	before := s.rss()
	conns := make([]net.Conn, 0, n)
	for range n {
		c, _, err := dial(s, transport)
		if err != nil {
			log.Printf("idle dial: %v", err)
			break
		}
		conns = append(conns, c)
	}
	time.Sleep(2 * time.Second) // let the server settle (GC, stacks)
	after := s.rss()
	for _, c := range conns {
		c.Close()
	}
	return (after - before) / float64(len(conns))
}

// serveNaive is the comparison: r3labs/sse's server, events published
// from POST /publish?stream=NAME to GET /events?stream=NAME (a stream is
// made by its first subscriber). It keeps nothing and checks nothing.
// GET /goroutines says how many goroutines it runs.
func serveNaive(addr string) {
	srv := sse.New()
	srv.AutoReplay = false
	srv.AutoStream = true
	mux := http.NewServeMux()
	mux.HandleFunc("/events", srv.ServeHTTP)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("/goroutines", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, runtime.NumGoroutine()) })
	mux.HandleFunc("POST /publish", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		srv.Publish(r.URL.Query().Get("stream"), &sse.Event{Data: b})
		w.WriteHeader(http.StatusNoContent)
	})
	log.Fatal(http.ListenAndServe(addr, mux))
}

func raiseFDLimit() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}
