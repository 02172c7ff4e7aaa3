package main

import (
	"fmt"
	"io"
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
// event, over a pool of keep-alive connections; each agent has viewers
// streams, half SSE and half WebSocket (all SSE on the naive server, which
// has no WebSocket, with one stream per agent). Each count of agents is
// measured on agentstream and then on the naive server, in one run.
func agentsScenarios(bin string, counts []int, perAgent, viewers int, d time.Duration) {
	fmt.Printf("%-13s %6s %5s %6s %10s %6s %5s %9s %9s %9s %12s %9s %6s %10s\n",
		"server", "agents", "ev/s", "subs", "delivered", "lost", "dup", "ingest99", "p50", "p99", "deliv/cpu-s", "rss-MiB", "feeds", "goroutines")
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
			fmt.Printf("%-13s %6d %5d %6d %10d %6d %5d %9s %9s %9s %12.0f %9.1f %6s %10d\n", kind, n, n*perAgent, n*viewers,
				r.delivered, r.lost, r.dup, r.ingest99.Round(10*time.Microsecond), r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond),
				float64(r.delivered)/r.cpu, r.rss/(1<<20), feeds, r.goroutines)
		}
	}
}

type agentsResult struct {
	result
	ingest99   time.Duration
	rss        float64 // peak, bytes
	feeds      int     // peak
	goroutines int     // peak
}

// runAgents opens viewers streams on each of n agents, posts seq 0, 1, 2,
// ... round robin over the agents (seq%n), perAgent a second each, and
// samples the server's RSS, feeds and goroutines every second.
func runAgents(s *server, secret string, n, perAgent, viewers int, d time.Duration) agentsResult {
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
	var peakMu sync.Mutex
	stopSampling := every(time.Second, func() {
		rss := s.rss()
		feeds, goroutines := s.gauges()
		peakMu.Lock()
		r.rss, r.feeds, r.goroutines = max(r.rss, rss), max(r.feeds, feeds), max(r.goroutines, goroutines)
		peakMu.Unlock()
	})
	pub := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	rate := n * perAgent
	total := int(d.Seconds() * float64(rate))
	var ingestMu sync.Mutex
	ingest := make([]time.Duration, 0, total)
	cpu0 := s.cpu()
	publishAll(total, rate, func(seq int) error {
		t := time.Now()
		var err error
		if s.naive {
			err = s.publishTo(pub, fmt.Sprintf("a%d", seq%n), seq)
		} else {
			err = s.publishAs(pub, tokens[seq%n], seq)
		}
		took := time.Since(t)
		ingestMu.Lock()
		ingest = append(ingest, took)
		ingestMu.Unlock()
		return err
	})
	waitQuiet(a.subs)
	cpu := s.cpu() - cpu0
	stopSampling()
	a.close()
	r.result = tally(a.subs, total, cpu, func(sub, seq int) bool { return seq%n == sub%n })
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
