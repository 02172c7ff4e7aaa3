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
	openStreams   *prometheus.GaugeVec
	eventsWritten *prometheus.CounterVec
	bytesWritten  *prometheus.CounterVec
	delivery      *prometheus.HistogramVec
	drops         *prometheus.CounterVec
	rateLimited   prometheus.Counter
	refused       *prometheus.CounterVec
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
		openStreams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "agentstream_streams_open",
			Help: "Open event streams by transport and HTTP protocol.",
		}, []string{"transport", "proto"}),
		eventsWritten: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "agentstream_stream_events_written_total",
			Help: "Events written to stream clients, by transport.",
		}, []string{"transport"}),
		bytesWritten: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "agentstream_stream_bytes_written_total",
			Help: "Event bytes written to stream clients, by transport.",
		}, []string{"transport"}),
		delivery: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "agentstream_stream_delivery_seconds",
			Help: "Time from an event's commit (its created_at) to the write that hands it to a stream's socket, " +
				"by transport and HTTP protocol; live events only, not the history a stream opened with.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 15),
		}, []string{"transport", "proto"}),
		drops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "agentstream_stream_ends_total",
			Help: "Streams that ended, by reason (agent exited, client gone, write timeout, ...).",
		}, []string{"reason"}),
		rateLimited: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentstream_ingest_rate_limited_total",
			Help: "Ingest requests refused with 429 because their agent posted past its rate.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "agentstream_refused_total",
			Help: "Connections, streams and tickets refused at a limit, by limit.",
		}, []string{"limit"}),
	}
	m.reg.MustRegister(m.ingested, m.appendSeconds, m.storeErrors, m.requests,
		m.openStreams, m.eventsWritten, m.bytesWritten, m.delivery, m.drops, m.rateLimited, m.refused,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
