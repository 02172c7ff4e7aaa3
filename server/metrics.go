package server

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the server's Prometheus series, on a registry of its own.
type metrics struct {
	reg           *prometheus.Registry
	ingested      prometheus.Counter
	appendSeconds prometheus.Histogram
	storeErrors   *prometheus.CounterVec
	requests      *prometheus.HistogramVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		ingested: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentstream_ingest_events_total",
			Help: "Events committed through the ingest API.",
		}),
		appendSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "agentstream_ingest_append_seconds",
			Help:    "Time from handing an ingest request's events to the store to their commit.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 14),
		}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "agentstream_store_errors_total",
			Help: "Store operations that failed, by operation.",
		}, []string{"op"}),
		requests: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "agentstream_http_request_duration_seconds",
			Help:    "HTTP request durations by route pattern and status code.",
			Buckets: prometheus.DefBuckets,
		}, []string{"route", "code"}),
	}
	m.reg.MustRegister(m.ingested, m.appendSeconds, m.storeErrors, m.requests,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
