package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/transport"
)

// TicketTTL is how long a stream ticket may wait to be redeemed.
const TicketTTL = 60 * time.Second

// maxBatch is the most events written to a client in one write.
const maxBatch = 256

// handleTicket is POST /api/towns/{townId}/container/agents/{agentId}/stream-ticket.
func (s *Server) handleTicket(w http.ResponseWriter, r *http.Request) {
	town, agent := r.PathValue("townId"), r.PathValue("agentId")
	if aerr := s.viewerOf(r, town); aerr != nil {
		writeError(w, aerr)
		return
	}
	t, err := s.store.CreateTicket(r.Context(), town, agent, TicketTTL)
	if err != nil {
		s.storeFailed(w, "ticket", err)
		return
	}
	// A path, never a URL built from the request's Host: behind a proxy the
	// Host is the proxy's idea, and a client resolves a path against the
	// origin it already trusts.
	path := fmt.Sprintf("/api/towns/%s/container/agents/%s/stream?ticket=%s",
		url.PathEscape(town), url.PathEscape(agent), t.ID)
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

// handleStream is GET /api/towns/{townId}/container/agents/{agentId}/stream:
// backfill after the cursor, then live, over SSE, WebSocket or NDJSON, until
// the agent exits, the client leaves or the server shuts down.
func (s *Server) handleStream(w http.ResponseWriter, r *http.Request) {
	town, agent := r.PathValue("townId"), r.PathValue("agentId")
	if !s.enterStream() {
		writeError(w, errorf(http.StatusServiceUnavailable, "shutting_down", "The server is shutting down; reconnect shortly."))
		return
	}
	defer s.streams.Done()
	if t := r.URL.Query().Get("ticket"); t != "" {
		ok, err := s.store.RedeemTicket(r.Context(), t, town, agent)
		if err != nil {
			s.storeFailed(w, "redeem", err)
			return
		}
		if !ok {
			writeError(w, errorf(http.StatusUnauthorized, "invalid_ticket", "The stream ticket is unknown, expired, already used, or for another agent; ask for a new one."))
			return
		}
	} else if aerr := s.viewerOf(r, town); aerr != nil {
		writeError(w, aerr)
		return
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
	key := model.AgentKey{Town: town, Agent: agent}
	last, err := s.store.Last(r.Context(), key)
	if err != nil {
		s.storeFailed(w, "last", err)
		return
	}
	ended := last != nil && last.Type == model.TypeExited && cursor >= last.ID

	if kind == "ws" {
		s.detachedStream(w, r, key, cursor, ended, func(gone func()) (transport.Stream, error) {
			return transport.UpgradeWS(w, r, s.streamOpts, gone)
		})
		return
	}
	if ended {
		// 204 is what stops a browser's EventSource from reconnecting.
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if r.ProtoMajor == 1 {
		s.detachedStream(w, r, key, cursor, false, func(gone func()) (transport.Stream, error) {
			return transport.HijackSSE(w, r, s.streamOpts, kind == "ndjson", gone)
		})
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stopOnDrain := context.AfterFunc(s.drain, cancel)
	defer stopOnDrain()
	var st transport.Stream
	if kind == "ndjson" {
		st, err = transport.NewNDJSON(w, r, s.streamOpts)
	} else {
		st, err = transport.NewSSE(w, r, s.streamOpts)
	}
	if err != nil {
		s.log.Info("stream open failed", "agent", agent, "transport", kind, "err", err)
		return
	}
	s.serveStream(ctx, st, key, cursor)
}

// detachedStream serves a stream on a connection taken over from net/http
// (a WebSocket, or SSE/NDJSON on HTTP/1.1). The handler returns after the
// takeover and the stream goes on in a goroutine of its own: net/http's
// connection goroutine then ends, and with it its grown stack and its
// buffers, which it would otherwise keep for the stream's whole life.
// open takes the function to call when the client has gone.
func (s *Server) detachedStream(w http.ResponseWriter, r *http.Request, key model.AgentKey, cursor int64, ended bool,
	open func(gone func()) (transport.Stream, error)) {
	// Not r.Context(): it ends when this handler returns.
	ctx, cancel := context.WithCancel(context.Background())
	st, err := open(cancel)
	if err != nil {
		cancel()
		s.log.Info("stream open failed", "agent", key.Agent, "err", err)
		return
	}
	if ended {
		cancel()
		st.Close(transport.ReasonEnded)
		return
	}
	s.streams.Add(1) // balanced in the goroutine; the handler's own Done follows
	go func() {
		defer s.streams.Done()
		defer cancel()
		stopOnDrain := context.AfterFunc(s.drain, cancel)
		defer stopOnDrain()
		s.serveStream(ctx, st, key, cursor)
	}()
}

// serveStream pumps events from the scheduler to st until the end.
func (s *Server) serveStream(ctx context.Context, st transport.Stream, key model.AgentKey, cursor int64) {
	start := time.Now()
	open := s.metrics.openStreams.WithLabelValues(st.Kind(), st.Proto())
	open.Inc()
	defer open.Dec()
	// No logger With(...) kept for the stream's life: on an idle stream
	// that clone would be one of the larger things it holds.
	attrs := func(more ...any) []any {
		return append([]any{"town", key.Town, "agent", key.Agent, "transport", st.Kind(), "proto", st.Proto()}, more...)
	}
	s.log.Info("stream connected", attrs("cursor", cursor)...)

	sent := 0
	reason := "client gone"
	defer func() {
		s.metrics.drops.WithLabelValues(reason).Inc()
		s.log.Info("stream disconnected", attrs("cursor", cursor, "events", sent, "duration", time.Since(start).Round(time.Millisecond), "reason", reason)...)
	}()

	sub, err := s.sched.Subscribe(ctx, key, cursor)
	if err != nil {
		reason = "server shutting down"
		st.Close(transport.ReasonShutdown)
		return
	}
	defer sub.Close()

	format := st.Format()
	encode := s.encoders[format]
	events := s.metrics.eventsWritten.WithLabelValues(st.Kind())
	bytesOut := s.metrics.bytesWritten.WithLabelValues(st.Kind())
	keepalive := time.NewTimer(s.streamOpts.Keepalive)
	defer keepalive.Stop()
	lastWrite := time.Now()
	var items []*poll.Item
	var frames [][]byte
	for {
		items, err = sub.NextOrIdle(ctx, keepalive.C, items, maxBatch)
		var gap *poll.GapError
		switch {
		case err == nil:
		case errors.Is(err, poll.ErrIdle):
			// The timer runs from the last keepalive, not the last write
			// (resetting it after every write costs a timer update per
			// batch); it only sends when the stream was really quiet.
			if quiet := time.Since(lastWrite); quiet < s.streamOpts.Keepalive {
				keepalive.Reset(s.streamOpts.Keepalive - quiet)
				continue
			}
			if err := st.Keepalive(); err != nil {
				reason = "write failed"
				return
			}
			lastWrite = time.Now()
			keepalive.Reset(s.streamOpts.Keepalive)
			continue
		case errors.As(err, &gap):
			first, _ := s.store.Oldest(ctx, key)
			payload, _ := json.Marshal(map[string]int64{"after": gap.After, "first_id": first})
			if err := st.WriteNotice("gap", payload); err != nil {
				reason = "write failed"
				return
			}
			continue
		case s.drain.Err() != nil, errors.Is(err, poll.ErrClosed):
			reason = "server shutting down"
			st.Close(transport.ReasonShutdown)
			return
		case ctx.Err() != nil:
			st.Close(transport.ReasonGone)
			return
		default:
			reason = "server error"
			s.log.Error("stream read", attrs("err", err)...)
			st.Close(transport.ReasonError)
			return
		}
		frames = frames[:0]
		exited := false
		n := 0
		for _, it := range items {
			f := it.Encoded(poll.Format(format), encode)
			frames = append(frames, f)
			n += len(f)
			if it.Type == model.TypeExited {
				exited = true
				break
			}
		}
		if err := st.WriteEvents(frames); err != nil {
			reason = "write failed"
			if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
				reason = "write timeout"
			}
			return
		}
		sent += len(frames)
		cursor = items[len(frames)-1].ID
		events.Add(float64(len(frames)))
		bytesOut.Add(float64(n))
		clear(frames)
		if exited {
			reason = "agent exited"
			st.Close(transport.ReasonEnded)
			return
		}
		lastWrite = time.Now()
	}
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
// WebSocket hijacking: a browser page of another site must not open a
// stream with its visitor's cookies or network position. No Origin (not a
// browser) is allowed; otherwise it must be this host or a --origin.
func (s *Server) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	if strings.EqualFold(u.Host, r.Host) {
		return true
	}
	for _, o := range s.origins {
		if strings.EqualFold(strings.TrimRight(o, "/"), origin) {
			return true
		}
	}
	return false
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
