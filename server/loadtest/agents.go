package main

import (
	"fmt"
	"io"
	"iter"
	"log"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	agentstream "github.com/agentstream/agentstream/server"
)

// agentsScenarios is the workload agents really have: many agents, few
// viewers each. Every agent posts perAgent events a second, one POST per
// event, each agent a client of its own that waits for each answer (as an
// agent's emitter does); each agent has viewers
// streams, half SSE and half WebSocket (all SSE on the naive server, which
// has no WebSocket, with one stream per agent). Each count of agents is
// measured on agentstream and then on the naive server, in one run.
func agentsScenarios(bin string, counts []int, perAgent float64, viewers int, d time.Duration) {
	fmt.Printf("%-13s %6s %6s %6s %10s %6s %5s %9s %9s %9s %12s %9s %6s %10s %9s\n",
		"server", "agents", "ev/s", "subs", "delivered", "lost", "dup", "ingest99", "p50", "p99", "deliv/cpu-s", "rss-MiB", "feeds", "goroutines", "idle-cpu%")
	secret := strings.Repeat("A", 40)
	for _, n := range counts {
		for _, kind := range []string{"agentstream", "r3labs-naive"} {
			s := startWith(kind, bin, nil, []string{"AGENTSTREAM_SECRET=" + secret})
			r := runAgents(s, secret, n, perAgent, viewers, d)
			s.stop()
			feeds := "-"
			if kind == "agentstream" {
				feeds = strconv.Itoa(r.feeds)
			}
			fmt.Printf("%-13s %6d %6.0f %6d %10d %6d %5d %9s %9s %9s %12.0f %9.1f %6s %10d %9.2f\n", kind, n, float64(n)*perAgent, n*viewers,
				r.delivered, r.lost, r.dup, r.ingest99.Round(10*time.Microsecond), r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond),
				float64(r.delivered)/r.cpu, r.rss/(1<<20), feeds, r.goroutines, r.idleCPU*100)
		}
	}
}

type agentsResult struct {
	result
	ingest99   time.Duration
	idleCPU    float64 // CPU-seconds per second with every stream open and nothing posted
	rss        float64 // peak, bytes
	feeds      int     // peak
	goroutines int     // peak
}

// runAgents opens viewers streams on each of n agents, measures the
// server's CPU for 5 s with nothing posted (what watched, quiet agents
// cost), then posts seq 0, 1, 2, ... round robin over the agents (seq%n),
// perAgent a second each, sampling the server's RSS, feeds and goroutines
// every second.
func runAgents(s *server, secret string, n int, perAgent float64, viewers int, d time.Duration) agentsResult {
	tokens := make([]string, n)
	if !s.naive {
		auth, err := agentstream.NewAuth([]byte(secret))
		if err != nil {
			log.Fatal(err)
		}
		if s.viewer, err = auth.MintViewer("load", time.Hour); err != nil {
			log.Fatal(err)
		}
		for i := range tokens {
			if tokens[i], err = auth.MintAgent("load", "r", fmt.Sprint("a", i), time.Hour); err != nil {
				log.Fatal(err)
			}
		}
	}
	transportOf := func(i int) string {
		if s.naive || i%2 == 0 {
			return "sse"
		}
		return "ws"
	}
	// Subscriber i follows agent i%n, so each agent's viewers alternate
	// between SSE and WebSocket when viewers is even.
	a := listenEach(n*viewers, transportOf, func(i int) (net.Conn, io.Reader, error) {
		path := fmt.Sprintf("/api/towns/load/container/agents/a%d/stream", i%n)
		if s.naive {
			path = fmt.Sprintf("/events?stream=a%d", i%n)
		}
		return dialPath(s, transportOf(i), path)
	})
	var r agentsResult
	const quiet = 5 * time.Second
	idle0 := s.cpu()
	time.Sleep(quiet)
	r.idleCPU = (s.cpu() - idle0) / quiet.Seconds()
	var peakMu sync.Mutex
	stopSampling := every(time.Second, func() {
		rss := s.rss()
		feeds, goroutines := s.gauges()
		peakMu.Lock()
		r.rss, r.feeds, r.goroutines = max(r.rss, rss), max(r.feeds, feeds), max(r.goroutines, goroutines)
		peakMu.Unlock()
	})
	perEach := max(1, int(d.Seconds()*perAgent))
	total := perEach * n
	cpu0 := s.cpu()
	ingest := postAsAgents(n, perEach, perAgent, func(c *http.Client, agent, seq int) error {
		if s.naive {
			return s.publishTo(c, fmt.Sprintf("a%d", agent), seq)
		}
		return s.publishAs(c, tokens[agent], seq)
	})
	waitQuiet(a.subs)
	cpu := s.cpu() - cpu0
	stopSampling()
	a.close()
	r.result = tallyStride(a.subs, n, total, cpu)
	slices.Sort(ingest)
	if len(ingest) > 0 {
		r.ingest99 = ingest[len(ingest)*99/100]
	}
	return r
}

// gauges reads the server's feeds and goroutines: agentstream's from
// /metrics, the naive server's goroutines from its /goroutines.
func (s *server) gauges() (feeds, goroutines int) {
	if s.naive {
		resp, err := http.Get(s.base + "/goroutines")
		if err != nil {
			return 0, 0
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		goroutines, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		return 0, goroutines
	}
	resp, err := http.Get(s.base + "/metrics")
	if err != nil {
		return 0, 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "agentstream_poll_feeds "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			feeds = int(f)
		}
		if v, ok := strings.CutPrefix(line, "go_goroutines "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			goroutines = int(f)
		}
	}
	return feeds, goroutines
}

// every calls f every interval on a goroutine of its own until the
// returned function is called.
func every(interval time.Duration, f func()) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				f()
			}
		}
	}()
	return func() { close(done); <-finished }
}

// postAsAgents has each of n agents post count events, perSecond a second,
// each agent a client with a connection of its own that waits for every
// answer; agent i's k-th event is seq k*n+i. The agents' schedules are
// spread over the first period. It returns every POST's time to answer.
func postAsAgents(n, count int, perSecond float64, post func(c *http.Client, agent, seq int) error) []time.Duration {
	period := time.Duration(float64(time.Second) / perSecond)
	start := time.Now()
	took := make([][]time.Duration, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			defer c.CloseIdleConnections()
			first := start.Add(period * time.Duration(i) / time.Duration(n))
			for k := range count {
				time.Sleep(time.Until(first.Add(period * time.Duration(k))))
				t := time.Now()
				if err := post(c, i, k*n+i); err != nil {
					log.Printf("agent %d, event %d: %v", i, k, err)
				}
				took[i] = append(took[i], time.Since(t))
			}
		})
	}
	wg.Wait()
	var all []time.Duration
	for _, t := range took {
		all = append(all, t...)
	}
	return all
}

// tallyStride is tally for subscribers that each follow one of n agents
// (subscriber i agent i%n), seq k*n+agent being the agent's events: it
// visits only each subscriber's own.
func tallyStride(subs []*subscriber, n, total int, cpu float64) result {
	return tallySeqs(subs, cpu, func(sub int) iter.Seq[int] {
		return func(yield func(int) bool) {
			for seq := sub % n; seq < total; seq += n {
				if !yield(seq) {
					return
				}
			}
		}
	})
}
