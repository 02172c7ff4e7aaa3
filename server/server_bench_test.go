package server

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
)

// unlimited lifts the per-agent ingest rate, which a benchmark that posts
// as fast as it can would otherwise measure.
var unlimited = Limits{IngestEvents: 1e12, IngestBytes: 1e15}

// BenchmarkPostSingle: one event per POST through the real HTTP server on
// 127.0.0.1, JWT check and durable commit included. "serial" is one client
// waiting for each answer; "parallel" is 64 clients at once.
func BenchmarkPostSingle(b *testing.B) {
	body := []byte(`{"type":"message.part.updated","data":{"part":{"type":"text","text":"Running the tests"},"delta":" tests"}}`)
	for _, par := range []int{0, 32} {
		name := "serial"
		if par > 0 {
			name = "parallel"
		}
		b.Run(name, func(b *testing.B) {
			e := newEnvWith(b, Options{Limits: unlimited}, model.Options{})
			tr := &http.Transport{MaxIdleConnsPerHost: 256}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			post := func() { benchPost(b, client, e, body, "") }
			b.ResetTimer()
			if par == 0 {
				for b.Loop() {
					post()
				}
			} else {
				b.SetParallelism(par)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						post()
					}
				})
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
		})
	}
}

// BenchmarkPostBatchKeyed: batches of 100 events from 8 clients at once,
// with and without an Idempotency-Key (a new one per batch), against the
// real HTTP server. The keyed/unkeyed ratio of events/s is the cost of
// exactly-once ingest: a key lookup and a key row in each commit.
func BenchmarkPostBatchKeyed(b *testing.B) {
	evs := make([]string, 100)
	for i := range evs {
		evs[i] = `{"type":"message.part.updated","data":{"part":{"type":"text","text":"Running the tests"},"delta":" tests"}}`
	}
	body := []byte(`{"events":[` + strings.Join(evs, ",") + `]}`)
	for _, keyed := range []bool{false, true} {
		b.Run(map[bool]string{false: "unkeyed", true: "keyed"}[keyed], func(b *testing.B) {
			e := newEnvWith(b, Options{Limits: unlimited}, model.Options{})
			tr := &http.Transport{MaxIdleConnsPerHost: 64}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			var n atomic.Int64
			b.SetParallelism(4) // 8 clients on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					key := ""
					if keyed {
						key = fmt.Sprint("k-", n.Add(1))
					}
					benchPost(b, client, e, body, key)
				}
			})
			b.ReportMetric(float64(b.N*len(evs))/b.Elapsed().Seconds(), "events/s")
		})
	}
}

// benchPost posts body as agent a1 of the env, with an Idempotency-Key
// unless key is empty, and expects a 201.
func benchPost(b *testing.B, client *http.Client, e *testEnv, body []byte, key string) {
	req, _ := http.NewRequest("POST", e.base+"/api/rigs/r1/agent-events", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+e.agent)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := client.Do(req)
	if err != nil {
		b.Error(err)
		return
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 201 {
		b.Errorf("status %d", resp.StatusCode)
	}
}

// BenchmarkIngest: ingest through the real HTTP server, batches of 100
// from 8 clients and single-event posts from 32, named by backend: the
// package's benchmarks run on SQLite, then on PostgreSQL (the package's
// test cluster, run without fsync: this compares the stores' paths, not
// the disks), so one run gives both.
func BenchmarkIngest(b *testing.B) {
	evs := make([]string, 100)
	for i := range evs {
		evs[i] = `{"type":"message.part.updated","data":{"part":{"type":"text","text":"Running the tests"},"delta":" tests"}}`
	}
	batch := []byte(`{"events":[` + strings.Join(evs, ",") + `]}`)
	single := []byte(evs[0])
	for _, w := range []struct {
		name    string
		body    []byte
		n, para int
	}{{"batch100", batch, 100, 4}, {"single", single, 1, 16}} {
		b.Run(current.Name+"/"+w.name, func(b *testing.B) {
			e := newEnvOn(b, current.DSN(b), Options{Limits: unlimited}, model.Options{}, poll.Options{})
			tr := &http.Transport{MaxIdleConnsPerHost: 64}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			b.SetParallelism(w.para)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					benchPost(b, client, e, w.body, "")
				}
			})
			b.ReportMetric(float64(b.N*w.n)/b.Elapsed().Seconds(), "events/s")
		})
	}
}
