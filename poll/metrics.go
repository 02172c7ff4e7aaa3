package poll

import (
	"github.com/prometheus/client_golang/prometheus"
	// client_golang's own data model, to read a counter back (tests, Polls).
	dto "github.com/prometheus/client_model/go"
)

// Metrics are the scheduler's Prometheus series; the server registers them.
type Metrics struct {
	feeds       prometheus.Gauge
	subscribers prometheus.Gauge
	polls       prometheus.Counter
	pollErrors  prometheus.Counter
	catchups    prometheus.Counter
	lag         prometheus.Histogram
}

func newMetrics() *Metrics {
	return &Metrics{
		feeds: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "agentstream_poll_feeds", Help: "Active feeds: agents being polled."}),
		subscribers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "agentstream_poll_subscribers", Help: "Open subscriptions across all feeds."}),
		polls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentstream_poll_reads_total", Help: "Source reads made by feeds."}),
		pollErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentstream_poll_errors_total", Help: "Source reads by feeds that failed."}),
		catchups: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentstream_poll_catchup_reads_total", Help: "Source reads by subscribers catching up (behind the feed's recent items)."}),
		lag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "agentstream_poll_delivery_lag_seconds",
			Help:    "Time from an event's commit to its fan-out.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
	}
}

// Collectors returns the series, for a registry.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.feeds, m.subscribers, m.polls, m.pollErrors, m.catchups, m.lag}
}

// Polls is the number of Source reads the feeds have made.
func (m *Metrics) Polls() float64 { return read(m.polls) }

// CatchUps is the number of Source reads made by subscribers catching up.
func (m *Metrics) CatchUps() float64 { return read(m.catchups) }

func read(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return 0
	}
	return m.GetCounter().GetValue()
}
