package main

import (
	"context"
	"fmt"
	"log"
	"strings"
	"time"

	"github.com/agentstream/agentstream/model/pgtest"
)

// scaleOutScenarios runs two agentstream instances on one PostgreSQL
// database, subscribers split over both and events posted to the first,
// on SSE and WebSocket: every subscriber must get every event once.
func scaleOutScenarios(bin string, d time.Duration) {
	cluster, err := pgtest.Start()
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Stop()
	fmt.Printf("%-12s %-4s %6s %5s %10s %6s %5s %9s %9s %14s\n",
		"instances", "tr", "subs", "ev/s", "delivered", "lost", "dup", "p50", "p99", "deliveries/cpu-s")
	for _, transport := range []string{"sse", "ws"} {
		dsn, err := cluster.NewDatabase(context.Background())
		if err != nil {
			log.Fatal(err)
		}
		env := []string{"AGENTSTREAM_SECRET=" + strings.Repeat("L", 40)}
		a := startWith("agentstream", bin, []string{"--db", dsn}, env)
		b := startWith("agentstream", bin, []string{"--db", dsn}, env)
		r := runOn(a, []*server{a, b}, transport, 1000, 200, d)
		a.stop()
		b.stop()
		fmt.Printf("%-12s %-4s %6d %5d %10d %6d %5d %9s %9s %14.0f\n", "2 on pg", transport, 1000, 200,
			r.delivered, r.lost, r.dup, r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond), float64(r.delivered)/r.cpu)
	}
}
