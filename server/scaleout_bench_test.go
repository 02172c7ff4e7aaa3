package server

import (
	"slices"
	"testing"
	"time"
)

// BenchmarkCrossInstanceLatency: the time from sending a POST to instance
// A to the event's arrival on a stream open on A, and on one open on B,
// two instances on one PostgreSQL database (feeds polling hourly: B hears
// of A's commits only through LISTEN/NOTIFY). One event at a time, so
// each is timed alone. Reports p50 and p99 of both, in the same run.
func BenchmarkCrossInstanceLatency(b *testing.B) {
	dsn := pgDSN(b)
	popts := pollHourly()
	a := newEnvOn(b, dsn, Options{Limits: unlimited}, zeroStore(), popts)
	c := newEnvOn(b, dsn, Options{Limits: unlimited}, zeroStore(), popts)
	last := a.mustPost(a.agent, `{"type":"session.created"}`)[0]
	onA, _ := a.open("sse-h1", "a1", last)
	onB, _ := c.open("sse-h1", "a1", last)
	defer onA.Close()
	defer onB.Close()
	type arrival struct {
		id int64
		at time.Time
	}
	listen := func(s streamClient) chan arrival {
		ch := make(chan arrival, 16)
		go func() {
			for {
				m, err := s.Next()
				if err != nil {
					close(ch)
					return
				}
				ch <- arrival{m.ID, time.Now()}
			}
		}()
		return ch
	}
	fromA, fromB := listen(onA), listen(onB)
	var local, remote []time.Duration
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		id := a.mustPost(a.agent, `{"type":"step"}`)[0]
		for _, w := range []struct {
			ch  chan arrival
			lat *[]time.Duration
		}{{fromA, &local}, {fromB, &remote}} {
			got := <-w.ch
			if got.id != id {
				b.Fatalf("got %d, want %d", got.id, id)
			}
			*w.lat = append(*w.lat, got.at.Sub(start))
		}
	}
	b.StopTimer()
	pct := func(d []time.Duration, p int) float64 {
		slices.Sort(d)
		return float64(d[len(d)*p/100].Microseconds()) / 1000
	}
	b.ReportMetric(pct(local, 50), "same-p50-ms")
	b.ReportMetric(pct(local, 99), "same-p99-ms")
	b.ReportMetric(pct(remote, 50), "cross-p50-ms")
	b.ReportMetric(pct(remote, 99), "cross-p99-ms")
}
