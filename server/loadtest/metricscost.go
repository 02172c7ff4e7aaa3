package main

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"
)

// metricsCost measures what the delivery-lag histogram costs: the
// fan-out scenarios with `serve --delivery-histogram` on and off, the two
// alternating (on first in odd repetitions, off first in even ones) so
// that the machine's drift falls on both. /metrics is scraped every
// second during each run, which prices the streams-behind gauge as well
// (it is computed at scrape time, 15 times more often than a usual
// Prometheus scrape interval).
func metricsCost(bin string, d time.Duration, reps int, only string) {
	fmt.Printf("%-4s %6s %5s %-4s %10s %6s %5s %9s %9s %14s\n",
		"tr", "subs", "ev/s", "hist", "delivered", "lost", "dup", "p50", "p99", "deliveries/cpu-s")
	for _, sc := range []struct{ subs, rate int }{{1000, 200}, {5000, 10}} {
		for _, transport := range []string{"sse", "ws"} {
			if !strings.Contains(fmt.Sprintf("%s/%dx%d", transport, sc.subs, sc.rate), only) {
				continue
			}
			var ratios []float64
			for rep := range reps {
				got := map[bool]float64{}
				order := []bool{true, false}
				if rep%2 == 1 {
					order = []bool{false, true}
				}
				for _, on := range order {
					var args []string
					if !on {
						args = []string{"--delivery-histogram=false"}
					}
					s := startWith("agentstream", bin, args, nil)
					stop := scrapeEvery(s, time.Second)
					r := run(s, transport, sc.subs, sc.rate, d)
					stop()
					s.stop()
					got[on] = float64(r.delivered) / r.cpu
					hist := "off"
					if on {
						hist = "on"
					}
					fmt.Printf("%-4s %6d %5d %-4s %10d %6d %5d %9s %9s %14.0f\n", transport, sc.subs, sc.rate, hist,
						r.delivered, r.lost, r.dup, r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond), got[on])
				}
				ratios = append(ratios, got[true]/got[false])
			}
			slices.Sort(ratios)
			fmt.Printf("%s %dx%d: deliveries per cpu-s, on/off, median of %d: %.3f %v\n", transport, sc.subs, sc.rate, reps, ratios[len(ratios)/2], ratios)
		}
	}
}

// scrapeEvery reads s's /metrics every interval until the returned
// function is called.
func scrapeEvery(s *server, interval time.Duration) (stop func()) {
	return every(interval, func() {
		resp, err := http.Get(s.base + "/metrics")
		if err != nil {
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	})
}
