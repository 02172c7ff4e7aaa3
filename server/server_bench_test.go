package server

import (
	"bytes"
	"io"
	"net/http"
	"testing"
)

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
			e := newEnv(b)
			tr := &http.Transport{MaxIdleConnsPerHost: 256}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			post := func() {
				req, _ := http.NewRequest("POST", e.base+"/api/rigs/r1/agent-events", bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+e.agent)
				req.Header.Set("Content-Type", "application/json")
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
