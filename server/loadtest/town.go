package main

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"time"

	agentstream "github.com/agentstream/agentstream/server"
)

// townScenarios compares one town's stream with its agents' streams: the
// agents post at a fixed rate each, and the same number of viewers watch
// either the whole town (each on the town's stream: every event) or one
// agent each (spread evenly over the agents' streams). A run with no
// viewers first measures the ingest alone; "net" divides deliveries by the
// CPU time above it, the streams' own cost.
func townScenarios(bin string, agents, perAgent, viewers int, d time.Duration) {
	secret := strings.Repeat("T", 40)
	measure := func(transport string, town bool, viewers int) result {
		s := startWith("agentstream", bin, nil, []string{"AGENTSTREAM_SECRET=" + secret})
		defer s.stop()
		return runTown(s, secret, transport, town, agents, perAgent, viewers, d)
	}
	base := measure("sse", true, 0)
	fmt.Printf("ingest alone: %d agents × %d events/s for %s: %.2f cpu-s\n", agents, perAgent, d, base.cpu)
	fmt.Printf("%-8s %-4s %6s %7s %5s %10s %6s %5s %9s %9s %14s %14s\n",
		"follows", "tr", "agents", "viewers", "ev/s", "delivered", "lost", "dup", "p50", "p99", "deliveries/cpu-s", "net")
	for _, transport := range []string{"sse", "ws"} {
		for _, town := range []bool{true, false} {
			r := measure(transport, town, viewers)
			what := "agents"
			if town {
				what = "town"
			}
			fmt.Printf("%-8s %-4s %6d %7d %5d %10d %6d %5d %9s %9s %14.0f %14.0f\n", what, transport, agents, viewers, agents*perAgent,
				r.delivered, r.lost, r.dup, r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond),
				float64(r.delivered)/r.cpu, float64(r.delivered)/(r.cpu-base.cpu))
		}
	}
}

// runTown posts seq 0, 1, 2, ... round robin over the agents (agent
// seq%agents), perAgent events per second each, while viewers read: each
// should get, once, every seq of what it follows.
func runTown(s *server, secret, transport string, town bool, agents, perAgent, viewers int, d time.Duration) result {
	auth, err := agentstream.NewAuth([]byte(secret))
	if err != nil {
		log.Fatal(err)
	}
	if s.viewer, err = auth.MintViewer("load", time.Hour); err != nil {
		log.Fatal(err)
	}
	tokens := make([]string, agents)
	for i := range tokens {
		if tokens[i], err = auth.MintAgent("load", "r", fmt.Sprint("a", i), time.Hour); err != nil {
			log.Fatal(err)
		}
	}
	a := listen(viewers, transport, func(i int) (net.Conn, io.Reader, error) {
		if town {
			return dialPath(s, transport, "/api/towns/load/stream")
		}
		return dialPath(s, transport, fmt.Sprintf("/api/towns/load/container/agents/a%d/stream", i%agents))
	})
	pub := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	rate := agents * perAgent
	total := int(d.Seconds() * float64(rate))
	cpu0 := s.cpu()
	publishAll(total, rate, func(seq int) error { return s.publishAs(pub, tokens[seq%agents], seq) })
	waitQuiet(a.subs)
	cpu := s.cpu() - cpu0
	a.close()
	return tally(a.subs, total, cpu, func(sub, seq int) bool { return town || seq%agents == sub%agents })
}
