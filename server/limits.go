package server

import (
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Limits are the bounds that keep one client, one agent or one town from
// taking the server from everyone else. Zero values are the defaults
// (docs/limits.md says why each is what it is).
type Limits struct {
	// StreamsPerTown caps a town's open streams, HTTP/2 streams included;
	// past it a stream is refused with 429 too_many_streams.
	StreamsPerTown int // default 10000
	// TicketsPerTown caps a town's unredeemed, unexpired stream tickets.
	TicketsPerTown int // default 1000
	// BodyTimeout bounds the time to read a request body: a client that
	// announces a body and trickles it, or never sends it, is cut off.
	BodyTimeout time.Duration // default 30 s
	// IngestEvents and IngestBytes are the sustained rate one agent of a
	// town may post, in events and body bytes per second; IngestEventBurst
	// and IngestByteBurst what it may post at once after a quiet spell.
	// Past them ingest answers 429 with Retry-After.
	IngestEvents     float64 // default 10000/s
	IngestEventBurst int     // default 20000; at least MaxBatch
	IngestBytes      float64 // default 8 MiB/s
	IngestByteBurst  int     // default 16 MiB; at least MaxBodyBytes
}

// The defaults of Limits.
const (
	DefaultStreamsPerTown   = 10000
	DefaultTicketsPerTown   = 1000
	DefaultBodyTimeout      = 30 * time.Second
	DefaultIngestEvents     = 10000
	DefaultIngestEventBurst = 20000
	DefaultIngestBytes      = 8 << 20
	DefaultIngestByteBurst  = 16 << 20
)

func (l *Limits) fill() {
	if l.StreamsPerTown <= 0 {
		l.StreamsPerTown = DefaultStreamsPerTown
	}
	if l.TicketsPerTown <= 0 {
		l.TicketsPerTown = DefaultTicketsPerTown
	}
	if l.BodyTimeout <= 0 {
		l.BodyTimeout = DefaultBodyTimeout
	}
	if l.IngestEvents <= 0 {
		l.IngestEvents = DefaultIngestEvents
	}
	if l.IngestEventBurst <= 0 {
		l.IngestEventBurst = DefaultIngestEventBurst
	}
	if l.IngestBytes <= 0 {
		l.IngestBytes = DefaultIngestBytes
	}
	if l.IngestByteBurst <= 0 {
		l.IngestByteBurst = DefaultIngestByteBurst
	}
	// A burst smaller than the largest request would refuse it forever.
	l.IngestEventBurst = max(l.IngestEventBurst, MaxBatch)
	l.IngestByteBurst = max(l.IngestByteBurst, MaxBodyBytes)
}

// townStreams counts open streams per town.
type townStreams struct {
	max int
	mu  sync.Mutex
	n   map[string]int
}

// acquire takes a stream slot of town, or reports false at the cap.
func (t *townStreams) acquire(town string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n[town] >= t.max {
		return false
	}
	t.n[town]++
	return true
}

func (t *townStreams) release(town string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n[town]--; t.n[town] <= 0 {
		delete(t.n, town)
	}
}

// rateLimiter is a token bucket per (town, agent) in two currencies,
// events and bytes: a request takes both or neither.
type rateLimiter struct {
	evRate, evBurst float64
	bRate, bBurst   float64
	now             func() time.Time

	mu        sync.Mutex
	buckets   map[townAgentKey]*bucket
	lastSweep time.Time
}

type townAgentKey struct{ town, agent string }

type bucket struct {
	events, bytes float64
	at            time.Time
}

func newRateLimiter(l Limits, now func() time.Time) *rateLimiter {
	if now == nil {
		now = time.Now
	}
	return &rateLimiter{
		evRate: l.IngestEvents, evBurst: float64(l.IngestEventBurst),
		bRate: l.IngestBytes, bBurst: float64(l.IngestByteBurst),
		now: now, buckets: make(map[townAgentKey]*bucket),
	}
}

// take spends events and bytes of k's bucket. When the bucket holds too
// little it spends nothing and says how long until it will hold enough.
func (r *rateLimiter) take(k townAgentKey, events, bytes int) (ok bool, retryAfter time.Duration) {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	b := r.buckets[k]
	if b == nil {
		r.sweep(now)
		b = &bucket{events: r.evBurst, bytes: r.bBurst, at: now}
		r.buckets[k] = b
	}
	r.refill(b, now)
	ev, by := float64(events), float64(bytes)
	if b.events >= ev && b.bytes >= by {
		b.events -= ev
		b.bytes -= by
		return true, 0
	}
	wait := max((ev-b.events)/r.evRate, (by-b.bytes)/r.bRate)
	return false, time.Duration(wait * float64(time.Second))
}

func (r *rateLimiter) refill(b *bucket, now time.Time) {
	dt := now.Sub(b.at).Seconds()
	if dt <= 0 {
		return
	}
	b.events = min(r.evBurst, b.events+dt*r.evRate)
	b.bytes = min(r.bBurst, b.bytes+dt*r.bRate)
	b.at = now
}

// sweep drops full buckets (a full bucket is the same as none), at most
// once a minute, so the map holds only agents that posted lately.
func (r *rateLimiter) sweep(now time.Time) {
	if now.Sub(r.lastSweep) < time.Minute {
		return
	}
	r.lastSweep = now
	for k, b := range r.buckets {
		r.refill(b, now)
		if b.events >= r.evBurst && b.bytes >= r.bBurst {
			delete(r.buckets, k)
		}
	}
}

// retryAfter sets Retry-After to d in whole seconds, at least 1.
func retryAfter(w http.ResponseWriter, d time.Duration) {
	w.Header().Set("Retry-After", strconv.Itoa(max(1, int(math.Ceil(d.Seconds())))))
}

// tooMany writes a 429 with Retry-After.
func tooMany(w http.ResponseWriter, d time.Duration, code, msg string) {
	retryAfter(w, d)
	writeError(w, errorf(http.StatusTooManyRequests, code, msg))
}

// bodyDeadline bounds the reading of the request body of h, which reads
// one: a client that announces a body and then trickles it or sends
// nothing is cut off after timeout instead of holding a connection and a
// goroutine forever.
func bodyDeadline(timeout time.Duration, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody {
			http.NewResponseController(w).SetReadDeadline(time.Now().Add(timeout))
		}
		h(w, r)
	}
}

// ignoreBody serves h, which reads no body, without ever waiting for one.
// net/http would read up to 256 KiB of an unread body after the handler,
// to keep the connection; a request that announces a body it never sends
// would hold the connection there forever. So the read deadline is set to
// now, and an HTTP/1 connection is closed after the answer (an HTTP/2
// stream ends alone).
func ignoreBody(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody {
			if r.ProtoMajor == 1 {
				w.Header().Set("Connection", "close")
				http.NewResponseController(w).SetReadDeadline(time.Now())
			} else {
				r.Body.Close()
			}
		}
		h(w, r)
	}
}

// maxConnsFromLimit is the default connection cap: the open-file limit
// less reserve descriptors for the database, listeners and logs.
func maxConnsFromLimit(nofile uint64, reserve int) int {
	n := int64(min(nofile, math.MaxInt32)) - int64(reserve)
	return int(max(n, 16))
}
