package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/transport"
	"github.com/prometheus/client_golang/prometheus"
)

// TicketTTL is how long a stream ticket may wait to be redeemed.
const TicketTTL = 60 * time.Second

var errShuttingDown = errorf(http.StatusServiceUnavailable, "shutting_down", "The server is shutting down; retry shortly (here or at another instance).")

var errInvalidTicket = errorf(http.StatusUnauthorized, "invalid_ticket",
	"The stream ticket is unknown, expired, already used, or for another agent; ask for a new one.")

// maxBatch is the most events written to a client in one write.
const maxBatch = 256

// handleTicket is POST /api/towns/{townId}/container/agents/{agentId}/stream-ticket,
// and POST /api/towns/{townId}/stream-ticket for the town's stream: a
// ticket opens only the stream it was asked for.
func (s *Server) handleTicket(w http.ResponseWriter, r *http.Request) {
	key, aerr := streamKey(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	town, agent := key.Town, key.Agent
	if aerr := s.viewerOf(r, town); aerr != nil {
		writeError(w, aerr)
		return
	}
	t, err := s.store.CreateTicket(r.Context(), town, agent, TicketTTL, s.limits.TicketsPerTown)
	if errors.Is(err, model.ErrTooManyTickets) {
		s.metrics.refused.WithLabelValues("tickets_per_town").Inc()
		tooMany(w, 10*time.Second, "too_many_tickets", fmt.Sprintf(
			"Town %q holds %d unredeemed stream tickets, its limit; redeem them or let them expire (%s).", town, s.limits.TicketsPerTown, TicketTTL))
		return
	}
	if err != nil {
		s.storeFailed(w, r, "ticket", err)
		return
	}
	// A path, never a URL built from the request's Host: behind a proxy the
	// Host is the proxy's idea, and a client resolves a path against the
	// origin it already trusts.
	path := fmt.Sprintf("/api/towns/%s/container/agents/%s/stream?ticket=%s",
		url.PathEscape(town), url.PathEscape(agent), t.ID)
	if key.IsTown() {
		path = fmt.Sprintf("/api/towns/%s/stream?ticket=%s", url.PathEscape(town), t.ID)
	}
	writeJSON(w, http.StatusCreated, map[string]any{
		"ticket": t.ID, "stream_path": path, "expires_at": t.ExpiresAt.Format(model.TimeFormat),
	})
}

// viewerOf checks that r carries a viewer token of town.
func (s *Server) viewerOf(r *http.Request, town string) *apiError {
	c, aerr := s.auth.authenticate(r)
	if aerr != nil {
		return aerr
	}
	if c.Scope != ScopeViewer {
		return errorf(http.StatusForbidden, "wrong_scope", "This needs a viewer token of the town.")
	}
	if c.Town != town {
		return errorf(http.StatusForbidden, "wrong_town", fmt.Sprintf("This token is for town %q, not %q.", c.Town, town))
	}
	return nil
}

// streamKey is what a stream request follows: the agent of its path, or
// the whole town when the path names none (GET /api/towns/{townId}/stream).
func streamKey(r *http.Request) (model.AgentKey, *apiError) {
	k := model.AgentKey{Town: r.PathValue("townId"), Agent: r.PathValue("agentId")}
	if k.IsTown() {
		return k, checkIDs("town", k.Town)
	}
	return k, checkIDs("town", k.Town, "agent", k.Agent)
}

// handleStream is GET /api/towns/{townId}/container/agents/{agentId}/stream,
// one agent's stream, and GET /api/towns/{townId}/stream, the town's: every
// event of its agents in id order, which never ends by itself. Both are
// backfill after the cursor, then live, over SSE, WebSocket or NDJSON,
// narrowed by the request's filter, until the agent exits (an agent's
// stream), the client leaves or the server shuts down.
//
// Everything that can refuse a stream is checked before its ticket is
// redeemed, so a ticket is used up only by a stream that opens.
func (s *Server) handleStream(w http.ResponseWriter, r *http.Request) {
	key, aerr := streamKey(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	town, agent := key.Town, key.Agent
	flt, aerr := parseFilter(r.URL.Query(), key.IsTown())
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	compact, aerr := parseCompact(r.URL.Query())
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	if !s.enterStream() {
		retryAfter(w, time.Second)
		writeError(w, errShuttingDown)
		return
	}
	defer s.streams.Done()
	ticket := r.URL.Query().Get("ticket")
	if ticket != "" && !model.ValidTicketID(ticket) {
		writeError(w, errInvalidTicket)
		return
	}
	if ticket == "" {
		if aerr := s.viewerOf(r, town); aerr != nil {
			writeError(w, aerr)
			return
		}
	}
	cursor, aerr := streamCursor(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	kind := transport.Negotiate(r)
	if kind == "ws" && !s.originAllowed(r) {
		writeError(w, errorf(http.StatusForbidden, "origin_not_allowed", "WebSocket connections from this origin are not allowed."))
		return
	}
	if r.Method == http.MethodHead {
		// What a GET would answer, without opening a stream.
		w.Header().Set("Content-Type", transport.ContentType(kind == "ndjson"))
		w.Header().Set("Cache-Control", "no-cache")
		return
	}
	if !s.townStrs.acquire(town) {
		s.metrics.refused.WithLabelValues("streams_per_town").Inc()
		tooMany(w, 5*time.Second, "too_many_streams", fmt.Sprintf(
			"Town %q has %d streams open, its limit; close one or retry later.", town, s.limits.StreamsPerTown))
		return
	}
	// The slot is the stream's until it ends; a detached stream takes it
	// with it.
	release := sync.OnceFunc(func() { s.townStrs.release(town) })
	defer func() {
		if release != nil {
			release()
		}
	}()
	if ticket != "" {
		ok, err := s.store.RedeemTicket(r.Context(), ticket, town, agent)
		if err != nil {
			s.storeFailed(w, r, "redeem", err)
			return
		}
		if !ok {
			writeError(w, errInvalidTicket)
			return
		}
	}
	target := streamTarget{key: key, filter: flt}
	ended := false
	if !key.IsTown() {
		last, err := s.store.Last(r.Context(), key)
		if err != nil {
			s.storeFailed(w, r, "last", err)
			return
		}
		ended = last != nil && last.Type == model.TypeExited && cursor >= last.ID
		if compact && last != nil {
			target.compactThrough = last.ID
		}
	} else if compact {
		var err error
		if target.compactThrough, err = s.store.Latest(r.Context(), key); err != nil {
			s.storeFailed(w, r, "latest", err)
			return
		}
	}

	if kind == "ws" {
		s.detachedStream(w, r, target, cursor, ended, release, func(gone func()) (transport.Stream, error) {
			return transport.UpgradeWS(w, r, s.streamOpts, gone)
		})
		release = nil
		return
	}
	if ended {
		// 204 is what stops a browser's EventSource from reconnecting.
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if r.ProtoMajor == 1 {
		s.detachedStream(w, r, target, cursor, false, release, func(gone func()) (transport.Stream, error) {
			return transport.HijackSSE(w, r, s.streamOpts, kind == "ndjson", gone)
		})
		release = nil
		return
	}
	if transport.CanDetach(w) {
		s.detachedStream(w, r, target, cursor, false, release, func(gone func()) (transport.Stream, error) {
			return transport.DetachSSE(w, r, s.streamOpts, kind == "ndjson", gone)
		})
		release = nil
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stopOnDrain := context.AfterFunc(s.drain, cancel)
	defer stopOnDrain()
	var st transport.Stream
	var err error
	if kind == "ndjson" {
		st, err = transport.NewNDJSON(w, r, s.streamOpts)
	} else {
		st, err = transport.NewSSE(w, r, s.streamOpts)
	}
	if err != nil {
		s.log.Info("stream open failed", "agent", agent, "transport", kind, "err", err)
		return
	}
	s.serveStream(ctx, st, target, cursor)
}

// streamTarget is what a stream follows: one agent, or a whole town when
// key has no agent, narrowed by filter.
type streamTarget struct {
	key    model.AgentKey
	filter filter
	// compactThrough, with ?compact=deltas, is the newest id when the
	// stream opened: the backfill, whose runs of deltas are merged
	// (compactDeltas). Live events are never held back to merge them.
	compactThrough int64
}

// detachedStream serves a stream taken from its handler: on a connection
// taken over from net/http (a WebSocket, or SSE/NDJSON on HTTP/1.1), or on
// an HTTP/2 stream of transport.H2. The handler returns after the
// takeover: net/http's connection goroutine (or the HTTP/2 handler's) then
// ends, and with it its grown stack and its buffers, which it would
// otherwise keep for the stream's whole life. From then on the stream has no goroutine while it
// is idle: the subscription's ready call starts one to write what came,
// and the transport's Poller tells of the client's frames.
// open takes the function to call when the client has gone. release is
// called once the stream has ended, whichever way.
func (s *Server) detachedStream(w http.ResponseWriter, r *http.Request, tg streamTarget, cursor int64, ended bool,
	release func(), open func(gone func()) (transport.Stream, error)) {
	// Not r.Context(): it ends when this handler returns.
	ctx, cancel := context.WithCancel(context.Background())
	st, err := open(cancel)
	if err != nil {
		cancel()
		release()
		s.log.Info("stream open failed", "town", tg.key.Town, "agent", tg.key.Agent, "err", err)
		return
	}
	if ended {
		cancel()
		st.Close(transport.ReasonEnded)
		release()
		return
	}
	stopOnDrain := context.AfterFunc(s.drain, cancel)
	s.streams.Add(1) // the handler's own Done follows at once
	s.track(st, true)
	p := s.openStream(ctx, st, tg, cursor, nil, func() {
		s.track(st, false)
		stopOnDrain()
		cancel()
		release()
		s.streams.Done()
	})
	if p != nil {
		go p.run() // the first step: backfill, or join the live path
	}
}

// serveStream serves a stream on the handler's goroutine (HTTP/2 served by
// net/http's server, with --net-http2) until it ends.
func (s *Server) serveStream(ctx context.Context, st transport.Stream, tg streamTarget, cursor int64) {
	wake := make(chan struct{}, 1)
	p := s.openStream(ctx, st, tg, cursor, wake, nil)
	if p == nil {
		return
	}
	for !p.step() {
		<-wake
	}
	p.finish()
}

// pump is one client's stream: a subscription and the transport it is
// written to. It is driven in steps: each writes all the subscription has
// ready, and a keepalive when one is due, without waiting for more.
type pump struct {
	s        *Server
	ctx      context.Context // the stream's: ends when the client goes or the server drains
	st       transport.Stream
	key      model.AgentKey
	filter   filter
	compact  int64 // streamTarget.compactThrough
	sub      *poll.Subscription
	start    time.Time
	open     prometheus.Gauge
	events   prometheus.Counter
	bytesOut prometheus.Counter
	delivery prometheus.Observer // nil: not recorded
	format   transport.Format
	encode   func(*model.Event) []byte

	// How the next step is started: a send on wake to the handler that
	// waits for it, or, when wake is nil, a goroutine started by notify
	// (which then lingers a while for the next notify, on kick).
	wake        chan struct{}
	pending     atomic.Int32  // notifies since the running goroutine last looked; >0 while one runs
	kick        chan struct{} // capacity 1: wakes a lingering goroutine
	lingerSince atomic.Int64  // the reaper's epoch when the goroutine began to linger; 0 while it does not
	reaped      atomic.Bool   // the reaper's kick: lingered long enough
	onFinish    func()        // for a detached stream, after finish

	keepalive *time.Timer
	kaDue     atomic.Bool

	// Owned by the goroutine running step.
	cursor    int64
	sent      int
	reason    string // why the stream ended, for the log and the drop metric
	lastWrite time.Time
	items     []*poll.Item
	frames    [][]byte
}

// openStream subscribes st's client to tg after cursor and logs the
// connect. When it cannot, it closes st, calls onFinish and returns nil.
//
// With wake set, notify sends on it, for a goroutine that waits there to
// step; without, notify starts a goroutine, but only after the caller's
// first run: notifies that come while the stream is being set up (a client
// gone at once, say) are held until then.
func (s *Server) openStream(ctx context.Context, st transport.Stream, tg streamTarget, cursor int64,
	wake chan struct{}, onFinish func()) *pump {
	p := &pump{s: s, ctx: ctx, st: st, key: tg.key, filter: tg.filter, compact: tg.compactThrough, cursor: cursor, start: time.Now(), wake: wake, onFinish: onFinish,
		open:     s.metrics.openStreams.WithLabelValues(st.Kind(), st.Proto()),
		events:   s.metrics.eventsWritten.WithLabelValues(st.Kind()),
		bytesOut: s.metrics.bytesWritten.WithLabelValues(st.Kind()),
		format:   st.Format(), encode: s.encoders[st.Format()]}
	if !s.noDelivery {
		p.delivery = s.metrics.delivery.WithLabelValues(st.Kind(), st.Proto())
	}
	if wake == nil {
		p.pending.Store(1) // held: see above
		p.kick = make(chan struct{}, 1)
	}
	s.log.Info("stream connected", p.attrs("cursor", cursor)...)
	sub, err := s.sched.SubscribeFunc(ctx, tg.key, cursor, p.notify)
	if err != nil {
		p.reason = "server shutting down"
		st.Close(transport.ReasonShutdown)
		p.logEnd()
		if onFinish != nil {
			onFinish()
		}
		return nil
	}
	p.sub = sub
	p.open.Inc()
	if wake == nil {
		s.reaper.add(p)
	}
	p.lastWrite = time.Now()
	if k := s.streamOpts.Keepalive; k > 0 {
		p.keepalive = time.AfterFunc(k, func() {
			p.kaDue.Store(true)
			p.notify()
		})
	}
	return p
}

// notify starts a step: the subscription has something, a keepalive is
// due, or the stream is ending. It never blocks.
func (p *pump) notify() {
	if p.wake != nil {
		select {
		case p.wake <- struct{}{}:
		default:
		}
		return
	}
	// Only the notify that finds no goroutine starts one; the running one
	// sees the others through pending, or kick while it lingers.
	if p.pending.Add(1) == 1 {
		go p.run()
		return
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *pump) run() {
	for {
		n := p.pending.Load()
		if p.step() {
			// pending stays above zero: no goroutine starts again.
			p.finish()
			return
		}
		if p.pending.Load() != n || !p.idle() {
			continue
		}
		// A quiet stream keeps no batch buffers: after a backfill they hold
		// up to maxBatch entries, and the items' events with them.
		p.items, p.frames = nil, nil
		p.sub.Trim()
		if p.pending.CompareAndSwap(n, 0) {
			return
		}
	}
}

// idle waits up to lingerFor for a notify, or a little more (the reaper
// ends the wait); it reports whether none came. (A kick left over from an
// earlier notify only costs one empty step.)
func (p *pump) idle() bool {
	p.lingerSince.Store(p.s.reaper.epoch.Load())
	<-p.kick
	p.lingerSince.Store(0)
	return p.reaped.Swap(false)
}

// step writes everything the subscription has ready, and a keepalive if
// one is due. It reports whether the stream has ended; then p.reason says
// why and the transport has been closed.
func (p *pump) step() (ended bool) {
	for {
		var err error
		p.items, err = p.sub.TryNext(p.ctx, p.items, maxBatch)
		var gap *poll.GapError
		switch {
		case err == nil:
		case errors.As(err, &gap):
			if err := p.writeGap(gap); err != nil {
				return p.broken(err)
			}
			continue
		case p.s.drain.Err() != nil:
			return p.end("server shutting down", transport.ReasonShutdown)
		case p.ctx.Err() != nil:
			return p.end("client gone", transport.ReasonGone)
		case errors.Is(err, poll.ErrClosed):
			return p.end("server shutting down", transport.ReasonShutdown)
		default:
			p.s.log.Error("stream read", p.attrs("err", err)...)
			return p.end("server error", transport.ReasonError)
		}
		if len(p.items) == 0 {
			break
		}
		items, exited := p.items, false
		if !p.key.IsTown() {
			// An agent's stream ends with its exit, filtered out or not.
			if i := slices.IndexFunc(items, func(it *poll.Item) bool { return it.Type == model.TypeExited }); i >= 0 {
				items, exited = items[:i+1], true
			}
		}
		items = p.filter.apply(items)
		if len(items) > 0 && items[0].ID <= p.compact {
			items = compactDeltas(items, p.compact)
		}
		// A batch the filter empties is not the end of what is ready.
		if len(items) > 0 {
			if ended := p.write(items); ended {
				return true
			}
		}
		if exited {
			return p.end("agent exited", transport.ReasonEnded)
		}
	}
	if p.keepalive != nil && p.kaDue.Swap(false) {
		// The timer runs from the last keepalive, not the last write
		// (resetting it after every write costs a timer update per batch);
		// it only sends when the stream was really quiet.
		k := p.s.streamOpts.Keepalive
		if quiet := time.Since(p.lastWrite); quiet < k {
			p.keepalive.Reset(k - quiet)
			return false
		}
		if err := p.st.Keepalive(); err != nil {
			return p.broken(err)
		}
		p.lastWrite = time.Now()
		p.keepalive.Reset(k)
	}
	return false
}

// write sends one batch; it reports whether the stream has ended (broken).
func (p *pump) write(items []*poll.Item) (ended bool) {
	frames := p.frames[:0]
	n := 0
	for _, it := range items {
		f := it.Encoded(poll.Format(p.format), p.encode)
		frames = append(frames, f)
		n += len(f)
	}
	err := p.st.WriteEvents(frames)
	clear(frames)
	p.frames = frames
	if err != nil {
		return p.broken(err)
	}
	p.sent += len(frames)
	p.cursor = items[len(frames)-1].ID
	p.events.Add(float64(len(frames)))
	p.bytesOut.Add(float64(n))
	now := time.Now()
	if p.delivery != nil {
		for _, it := range items {
			// History the stream opened with is not late: it is old.
			if it.CreatedAt.After(p.start) {
				p.delivery.Observe(now.Sub(it.CreatedAt).Seconds())
			}
		}
	}
	p.lastWrite = now
	return false
}

// writeGap tells the client that events after its cursor were pruned
// before it could read them: {"after", "first_id"}, the oldest id still
// held, and on a town stream "agent", the one agent whose events are gone
// (the notice comes before any of that agent's remaining events). A gap of
// an agent the filter leaves out is not told.
func (p *pump) writeGap(gap *poll.GapError) error {
	notice := struct {
		Agent   string `json:"agent,omitempty"`
		After   int64  `json:"after"`
		FirstID int64  `json:"first_id"`
	}{Agent: gap.Agent, After: gap.After}
	k := p.key
	if gap.Agent != "" {
		k.Agent = gap.Agent
		rig := ""
		if len(p.filter.rigs) > 0 {
			var err error
			if rig, err = p.s.store.Rig(p.ctx, k); err != nil {
				rig = p.filter.rigs[0] // unknown: tell rather than stay silent
			}
		}
		if !p.filter.agentPasses(rig, gap.Agent) {
			return nil
		}
	}
	notice.FirstID, _ = p.s.store.Oldest(p.ctx, k)
	payload, _ := json.Marshal(notice)
	return p.st.WriteNotice("gap", payload)
}

// broken ends a stream whose write failed: the client is gone or not
// reading, so it is told nothing more.
func (p *pump) broken(err error) bool {
	reason := "write failed"
	switch {
	case errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		reason = "write timeout"
	case errors.Is(err, transport.ErrSilent):
		reason = "client silent"
	}
	return p.end(reason, transport.ReasonGone)
}

func (p *pump) end(reason string, r transport.Reason) bool {
	p.reason = reason
	p.st.Close(r)
	return true
}

// finish releases what the stream held, after the step that ended it.
func (p *pump) finish() {
	if p.keepalive != nil {
		p.keepalive.Stop()
	}
	p.sub.Close()
	p.open.Dec()
	if p.wake == nil {
		p.s.reaper.remove(p)
	}
	p.logEnd()
	if p.onFinish != nil {
		p.onFinish()
	}
}

// attrs are the log attributes of the stream, then more. (No logger
// With(...) is kept for the stream's life: on an idle stream that clone
// would be one of the larger things it holds.)
func (p *pump) attrs(more ...any) []any {
	return append([]any{"town", p.key.Town, "agent", p.key.Agent, "transport", p.st.Kind(), "proto", p.st.Proto()}, more...)
}

// logEnd logs the end of a stream. events_written counts the events of
// whole writes the connection accepted, and cursor is the last of them: a
// write cut short by the write timeout is not counted, not even the part
// of it that went out. For a client dropped mid-write that is a lower
// bound of what it may have received; it resumes from its own last id.
func (p *pump) logEnd() {
	p.s.metrics.drops.WithLabelValues(p.reason).Inc()
	p.s.log.Info("stream disconnected", p.attrs("cursor", p.cursor, "events_written", p.sent,
		"duration", time.Since(p.start).Round(time.Millisecond), "reason", p.reason)...)
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}

// streamCursor reads the cursor: Last-Event-ID (what EventSource sends when
// it reconnects), else ?after, else 0.
func streamCursor(r *http.Request) (int64, *apiError) {
	if v := r.Header.Values("Last-Event-ID"); len(v) > 0 {
		return parseCursor(strings.TrimSpace(v[0]), "Last-Event-ID")
	}
	return parseCursor(r.URL.Query().Get("after"), "after")
}

// originAllowed is the WebSocket Origin check that stops cross-site
// WebSocket hijacking: a page of another site must not open a stream from
// its visitor's browser. No Origin (not a browser) is allowed; otherwise
// its scheme and host must be the server's own origin — the scheme this
// request came over and its Host — or one of --origin.
//
// Streams carry no ambient credentials (no cookies: a bearer token or a
// one-time ticket, which another site's page does not have), so a page
// that gets past this check by DNS rebinding, where its own name resolves
// to this server and so names its own origin in Host, still opens nothing.
func (s *Server) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	o, ok := normalOrigin(origin)
	if !ok {
		return false
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if self, ok := normalOrigin(scheme + "://" + r.Host); ok && self == o {
		return true
	}
	for _, allowed := range s.origins {
		if a, ok := normalOrigin(allowed); ok && a == o {
			return true
		}
	}
	return false
}

// normalOrigin returns an http or https origin as scheme://host[:port],
// lower case and without its scheme's default port, so that equal origins
// compare equal as strings. Anything else ("null", a path, user info) is
// not an origin.
func normalOrigin(v string) (string, bool) {
	u, err := url.Parse(strings.TrimSuffix(v, "/"))
	if err != nil || u.Host == "" || u.User != nil || u.Path != "" || u.RawQuery != "" || u.Fragment != "" {
		return "", false
	}
	scheme := strings.ToLower(u.Scheme)
	if scheme != "http" && scheme != "https" {
		return "", false
	}
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if port == "" || scheme == "http" && port == "80" || scheme == "https" && port == "443" {
		port = ""
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	if port != "" {
		host += ":" + port
	}
	return scheme + "://" + host, true
}

// encoders returns, per transport format, the function that turns an event
// into its frame; poll.Item caches the result, once per event and format.
func encoders() map[transport.Format]func(*model.Event) []byte {
	m := map[transport.Format]func(*model.Event) []byte{}
	for _, f := range []transport.Format{transport.FormatSSE, transport.FormatWS, transport.FormatNDJSON} {
		m[f] = func(ev *model.Event) []byte {
			js, err := json.Marshal(ev)
			if err != nil {
				// Data is valid JSON by construction (checked at ingest).
				js = []byte(`{"id":` + fmt.Sprint(ev.ID) + `,"error":"unencodable event"}`)
			}
			return transport.Encode(f, ev.ID, js)
		}
	}
	return m
}
