// Package server is agentstream's HTTP API: routes, authentication, input
// validation, JSON errors, metrics, and the serve command's lifecycle.
package server

import (
	"context"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/transport"
)

// Server is the HTTP API over one Store and the poll scheduler that feeds
// its streams.
type Server struct {
	store      *model.Store
	sched      *poll.Scheduler
	auth       *Auth
	log        *slog.Logger
	metrics    *metrics
	handler    http.Handler
	streamOpts transport.Options
	origins    []string
	encoders   map[transport.Format]func(*model.Event) []byte
	limits     Limits
	townStrs   *townStreams
	rate       *rateLimiter
	noDelivery bool         // Options.NoDeliveryHistogram
	netHTTP2   bool         // Options.NetHTTP2
	reaper     reaper       // ends detached streams' lingering goroutines
	lastProbe  atomic.Int64 // UnixNano of readyz's last write probe

	drain    context.Context // cancelled by Drain: every stream ends
	drainNow context.CancelFunc
	mu       sync.Mutex                    // orders streams.Add before Drain's Wait
	draining atomic.Bool                   // set under mu
	detached map[transport.Stream]struct{} // streams on taken-over connections; guarded by mu
	streams  sync.WaitGroup                // open streams, hijacked WebSockets included
}

// Options tune a Server; zero values are the defaults.
type Options struct {
	Log          *slog.Logger  // default slog.Default()
	WriteTimeout time.Duration // a client that accepts no bytes this long is dropped; default 10 s
	Keepalive    time.Duration // SSE comment / WS ping interval; default 30 s
	Origins      []string      // origins allowed to open WebSockets besides the server's own
	// Poller hears idle streams' clients without a goroutine each; nil
	// means a goroutine per stream waits in a read (see transport.Poller).
	Poller *transport.Poller
	Limits Limits
	// Now is the clock of the ingest rate limits; default time.Now.
	Now func() time.Time
	// NoDeliveryHistogram leaves agentstream_stream_delivery_seconds
	// empty, saving an observation per event and stream.
	NoDeliveryHistogram bool
	// NetHTTP2 leaves HTTP/2 to net/http's server, where an event stream
	// keeps its handler goroutine; by default agentstream serves HTTP/2
	// itself and detaches streams as on HTTP/1.1 (transport.H2).
	NetHTTP2 bool
}

// New returns a Server. It wires the store's commit hook to the scheduler,
// so local appends reach streams at once, and registers the scheduler's
// metrics.
func New(store *model.Store, sched *poll.Scheduler, auth *Auth, opts Options) *Server {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 10 * time.Second
	}
	if opts.Keepalive <= 0 {
		opts.Keepalive = 30 * time.Second
	}
	opts.Limits.fill()
	s := &Server{
		store: store, sched: sched, auth: auth, log: opts.Log, metrics: newMetrics(),
		limits:     opts.Limits,
		townStrs:   &townStreams{max: opts.Limits.StreamsPerTown, n: make(map[string]int)},
		rate:       newRateLimiter(opts.Limits, opts.Now),
		streamOpts: transport.Options{WriteTimeout: opts.WriteTimeout, Keepalive: opts.Keepalive, Poller: opts.Poller},
		origins:    opts.Origins,
		encoders:   encoders(),
		noDelivery: opts.NoDeliveryHistogram,
		netHTTP2:   opts.NetHTTP2,
	}
	s.drain, s.drainNow = context.WithCancel(context.Background())
	store.OnCommit(sched.Committed)
	s.metrics.reg.MustRegister(sched.Metrics.Collectors()...)
	s.metrics.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "agentstream_store_writable",
		Help: "1 while the store commits writes, 0 while its last write failed (disk full, read-only filesystem, ...).",
	}, func() float64 {
		if store.Writable() != nil {
			return 0
		}
		return 1
	}))
	s.handler = s.routes()
	return s
}

// BeginDrain stops taking work: /readyz answers 503, new streams and new
// ingest requests are refused with 503 shutting_down, and every open
// stream is told to end (SSE responses end, WebSockets close with 1001).
// Requests already being served finish.
func (s *Server) BeginDrain() {
	s.mu.Lock()
	s.draining.Store(true)
	s.mu.Unlock()
	s.drainNow()
}

// Drain is BeginDrain, then a wait for the open streams to end, up to
// ctx. A stream still writing to a client that reads nothing would hold
// on for the write timeout; when ctx ends first, the connections of the
// streams that took theirs over from net/http are closed under them
// (http.Server.Close does it for the others), and Drain returns ctx's
// error once they are gone. Call it with http.Server.Shutdown, which
// waits for neither kind of stream.
func (s *Server) Drain(ctx context.Context) error {
	s.BeginDrain()
	done := make(chan struct{})
	go func() {
		s.streams.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	for st := range s.detached {
		if a, ok := st.(interface{ Abort() }); ok {
			a.Abort()
		}
	}
	s.mu.Unlock()
	// An aborted stream's write fails at once; the wait is only for its
	// goroutine to finish.
	select {
	case <-done:
	case <-time.After(2 * time.Second):
	}
	return ctx.Err()
}

// isDraining reports whether BeginDrain was called.
func (s *Server) isDraining() bool { return s.draining.Load() }

// track adds a stream on a taken-over connection to what Drain may abort,
// or removes it when it has ended.
func (s *Server) track(st transport.Stream, open bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !open {
		delete(s.detached, st)
		return
	}
	if s.detached == nil {
		s.detached = make(map[transport.Stream]struct{})
	}
	s.detached[st] = struct{}{}
}

// enterStream counts a stream in, unless the server is draining.
func (s *Server) enterStream() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining.Load() {
		return false
	}
	s.streams.Add(1)
	return true
}

// ServeHTTP serves the API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	allowed := map[string][]string{} // path pattern -> methods
	// Every handler but ingest reads no body, and must not wait for one.
	handle := func(method, path string, h http.HandlerFunc) {
		mux.HandleFunc(method+" "+path, ignoreBody(h))
		allowed[path] = append(allowed[path], method)
	}
	mux.HandleFunc("POST /api/rigs/{rigId}/agent-events", bodyDeadline(s.limits.BodyTimeout, s.handleIngest))
	allowed["/api/rigs/{rigId}/agent-events"] = []string{"POST"}
	handle("GET", "/api/rigs/{rigId}/agents/{agentId}/events", s.handleEvents)
	handle("GET", "/api/towns/{townId}/agents", s.handleAgents)
	handle("POST", "/api/towns/{townId}/container/agents/{agentId}/stream-ticket", s.handleTicket)
	handle("GET", "/api/towns/{townId}/container/agents/{agentId}/stream", s.handleStream)
	handle("POST", "/api/towns/{townId}/stream-ticket", s.handleTicket)
	handle("GET", "/api/towns/{townId}/stream", s.handleStream)
	handle("GET", "/healthz", s.handleHealthz)
	handle("GET", "/readyz", s.handleReadyz)
	handle("GET", "/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}).ServeHTTP)
	handle("GET", "/{$}", handleAsset("index.html", "text/html; charset=utf-8"))
	handle("GET", "/app.js", handleAsset("app.js", "text/javascript; charset=utf-8"))
	handle("GET", "/app.css", handleAsset("app.css", "text/css; charset=utf-8"))

	// net/http answers a known path with the wrong method by a plain-text
	// 405; the API promises JSON errors, so every path gets a method-less
	// fallback that says which methods it takes.
	for path, methods := range allowed {
		if slices.Contains(methods, "GET") {
			methods = append(methods, "HEAD")
		}
		allow := strings.Join(methods, ", ")
		mux.HandleFunc(path, ignoreBody(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, errorf(http.StatusMethodNotAllowed, "method_not_allowed", r.Method+" is not allowed here; use "+allow+"."))
		}))
	}
	mux.HandleFunc("/", ignoreBody(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorf(http.StatusNotFound, "not_found", "No such endpoint: "+r.URL.Path))
	}))
	return s.instrument(mux)
}

// instrument records each request's duration by route pattern and code.
func (s *Server) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		next.ServeHTTP(sw, r)
		route := r.Pattern // set by the mux on this same request
		if route == "" {
			route = "unmatched"
		}
		s.metrics.requests.WithLabelValues(route, strconv.Itoa(sw.code)).Observe(time.Since(start).Seconds())
	})
}

// statusWriter remembers the status code written through it.
type statusWriter struct {
	http.ResponseWriter
	code    int
	written bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.written {
		w.code, w.written = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the connection (flush,
// deadlines) through the wrapper.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (s *Server) handleHealthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// handleReadyz answers 200 while the server can take work: the database
// answers and its last write committed. After a failed write it probes
// with a write of its own, at most once a second, so that it says ready
// again as soon as writes work, without waiting for a client's.
func (s *Server) handleReadyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if s.isDraining() {
		writeError(w, errShuttingDown)
		return
	}
	if err := s.store.Ping(ctx); err != nil {
		s.storeFailed(w, r, "ping", err)
		return
	}
	if err := s.store.Writable(); err != nil {
		now := time.Now().UnixNano()
		if last := s.lastProbe.Load(); now-last >= int64(time.Second) && s.lastProbe.CompareAndSwap(last, now) {
			s.store.ProbeWrite(ctx)
		}
		if err := s.store.Writable(); err != nil {
			writeError(w, errorf(http.StatusServiceUnavailable, "store_not_writable",
				"The store cannot commit writes ("+err.Error()+"); ingest answers 503 until it can."))
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}
