package server

import (
	"fmt"
	"testing"

	"github.com/agentstream/agentstream/model"
)

// TestDeliveryMetrics: on every transport, agentstream_stream_delivery_seconds
// counts each live event a stream wrote, under the stream's transport and
// protocol, and not the history it opened with; the streams-behind gauge is
// served; with NoDeliveryHistogram nothing is recorded.
func TestDeliveryMetrics(t *testing.T) {
	protos := map[string]string{"sse-h1": "HTTP/1.1", "sse-h2c": "HTTP/2.0", "sse-h2tls": "HTTP/2.0", "ws": "HTTP/1.1", "ndjson": "HTTP/1.1"}
	kinds := map[string]string{"sse-h1": "sse", "sse-h2c": "sse", "sse-h2tls": "sse", "ws": "ws", "ndjson": "ndjson"}
	for _, kind := range transports {
		for _, off := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/off=%v", kind, off), func(t *testing.T) {
				e := newEnvWith(t, Options{NoDeliveryHistogram: off}, model.Options{})
				e.mustPost(e.agent, steps(5))
				c, code := e.open(kind, "a1", 0)
				if code != 200 && code != 101 {
					t.Fatalf("open: %d", code)
				}
				defer c.Close()
				readN(t, c, 5)
				e.mustPost(e.agent, steps(3))
				readN(t, c, 3)
				series := fmt.Sprintf(`agentstream_stream_delivery_seconds_count{proto=%q,transport=%q}`, protos[kind], kinds[kind])
				if off {
					// The stream wrote all 8 before the client read them.
					if n := e.metric(series); n != 0 {
						t.Fatalf("%s = %v with the histogram off", series, n)
					}
				} else {
					// Observed just after the write: the client may be first.
					waitUntil(t, series+" = 3 (the live events only)", func() bool { return e.metric(series) == 3 })
				}
				if n := e.metric(`agentstream_streams_behind{more_than="10"}`); n != 0 {
					t.Fatalf("streams behind by more than 10: %v, want 0", n)
				}
				if !e.hasMetric(`agentstream_streams_behind{more_than="1000"}`) {
					t.Fatal("/metrics lacks agentstream_streams_behind")
				}
			})
		}
	}
}
