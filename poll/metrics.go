package poll

import (
	"strconv"

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
	behind      behindCollector
}

func newMetrics(s *Scheduler) *Metrics {
	return &Metrics{
		behind: behindCollector{s: s, desc: prometheus.NewDesc("agentstream_streams_behind",
			"Subscriptions (streams) with more than more_than of their feed's events not yet written; "+
				"counted against the events the feed keeps in memory, so a lower bound.",
			[]string{"more_than"}, nil)},
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
	return []prometheus.Collector{m.feeds, m.subscribers, m.polls, m.pollErrors, m.catchups, m.lag, m.behind}
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

// BehindThresholds are the counts agentstream_streams_behind is reported
// for, as its more_than label.
func BehindThresholds() []int { return []int{10, 100, 1000} }

// behindCollector counts the subscriptions that are behind when scraped:
// nothing is kept up to date between scrapes.
type behindCollector struct {
	s    *Scheduler
	desc *prometheus.Desc
}

func (c behindCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c behindCollector) Collect(ch chan<- prometheus.Metric) {
	over := BehindThresholds()
	for i, n := range c.s.Behind(over...) {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), strconv.Itoa(over[i]))
	}
}
