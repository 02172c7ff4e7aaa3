package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"testing"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/server/container"
)

// BenchmarkRelayPull is the relay's own capacity, apart from how often it
// pulls: the events of a 1000-event ring copied from a container on
// 127.0.0.1 into the store (HTTP pages of 100, JSON, one durable commit per
// page). Reported as events/s; the process that writes them runs with the
// timer stopped.
func BenchmarkRelayPull(b *testing.B) {
	quiet := slog.New(slog.DiscardHandler)
	c := container.New(container.Options{RingLen: 1000, Log: quiet})
	cs := httptest.NewServer(c.Handler(relaySecret))
	defer cs.Close()
	defer c.Close(context.Background())
	e := newEnv(b)
	client := &container.Client{URL: cs.URL, Secret: relaySecret}
	r := NewRelay(client, e.store, "t1", "r1", quiet)
	ctx := context.Background()
	const n = 999 // and agent.exited
	script := testScript(b, "count.sh")
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		id := fmt.Sprint("bench-", i)
		if _, err := client.Start(ctx, container.StartRequest{AgentID: id, Command: []string{"sh", script, fmt.Sprint(n)}}); err != nil {
			b.Fatal(err)
		}
		for p, _ := client.Events(ctx, id, n, 1); p.State != container.StateExited; p, _ = client.Events(ctx, id, n, 1) {
		}
		b.StartTimer()
		got := 0
		for got < n+1 {
			m, err := r.Pull(ctx, model.AgentKey{Town: "t1", Agent: id})
			if err != nil {
				b.Fatal(err)
			}
			got += m
		}
	}
	b.ReportMetric(float64(b.N*(n+1))/b.Elapsed().Seconds(), "events/s")
}
