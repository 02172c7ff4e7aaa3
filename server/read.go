package server

import (
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
)

// Read limits for GET .../events.
const (
	DefaultLimit = 100
	MaxLimit     = 1000
)

// handleEvents is GET /api/rigs/{rigId}/agents/{agentId}/events: one page of
// an agent's history after a cursor.
func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	c, aerr := s.auth.authenticate(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	rig, agent := r.PathValue("rigId"), r.PathValue("agentId")
	if aerr := checkIDs("rig", rig, "agent", agent); aerr != nil {
		writeError(w, aerr)
		return
	}
	if c.Scope == ScopeAgent && (c.Subject != agent || c.Rig != rig) {
		writeError(w, errorf(http.StatusForbidden, "wrong_agent", "An agent token reads only its own events; use a viewer token."))
		return
	}
	q := r.URL.Query()
	after, aerr := parseCursor(q.Get("after_id"), "after_id")
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	limit := DefaultLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxLimit {
			writeError(w, errorf(http.StatusBadRequest, "invalid_limit", fmt.Sprintf("limit must be an integer from 1 to %d.", MaxLimit)))
			return
		}
		limit = n
	}
	compact, aerr := parseCompact(q)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	key := model.AgentKey{Town: c.Town, Rig: rig, Agent: agent}
	evs, err := s.store.After(r.Context(), key, after, limit+1)
	if err != nil {
		s.storeFailed(w, r, "after", err)
		return
	}
	more := len(evs) > limit
	evs = evs[:min(len(evs), limit)]
	next := after
	if len(evs) > 0 {
		next = evs[len(evs)-1].ID
	}
	// Read after the page: a prune between the two reads then shows as a
	// gap rather than passing unseen.
	pruned, err := s.store.PrunedThrough(r.Context(), key)
	if err != nil {
		s.storeFailed(w, r, "prune_mark", err)
		return
	}
	var gap *pageGap
	if after < pruned {
		// Events after the cursor were deleted by retention: say so, and
		// from where the history goes on.
		first := int64(0)
		if len(evs) > 0 {
			first = evs[0].ID
		} else if first, err = s.store.Oldest(r.Context(), key); err != nil {
			s.storeFailed(w, r, "oldest", err)
			return
		}
		gap = &pageGap{After: after, FirstID: first}
	}
	if compact {
		// limit counts events as stored; a page merges what it holds.
		evs = compactPage(evs)
	}
	writeJSON(w, http.StatusOK, struct {
		Events      []model.Event `json:"events"`
		NextAfterID int64         `json:"next_after_id"`
		HasMore     bool          `json:"has_more"`
		Gap         *pageGap      `json:"gap,omitempty"`
	}{evs, next, more, gap})
}

// compactPage is compactDeltas for a page of history: every event of it.
func compactPage(evs []model.Event) []model.Event {
	if len(evs) < 2 {
		return evs
	}
	items := make([]*poll.Item, len(evs))
	for i := range evs {
		items[i] = &poll.Item{Event: evs[i]}
	}
	items = compactDeltas(items, evs[len(evs)-1].ID)
	out := make([]model.Event, len(items))
	for i, it := range items {
		out[i] = it.Event
	}
	return out
}

// pageGap tells a page reader that retention deleted events after its
// cursor: the page goes on from FirstID (0: nothing is held now).
type pageGap struct {
	After   int64 `json:"after"`
	FirstID int64 `json:"first_id"`
}

// checkIDs checks path ids, given as name, value pairs, by the rules of
// model.CheckID: 400 invalid_<name>_id for the first that breaks them.
func checkIDs(pairs ...string) *apiError {
	for i := 0; i+1 < len(pairs); i += 2 {
		if msg := model.CheckID(pairs[i], pairs[i+1]); msg != "" {
			return errorf(http.StatusBadRequest, "invalid_"+pairs[i]+"_id", msg)
		}
	}
	return nil
}

// parseCursor reads an event id cursor: empty is 0; otherwise a base-10
// integer >= 0 that fits in 63 bits.
func parseCursor(v, name string) (int64, *apiError) {
	if v == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return 0, errorf(http.StatusBadRequest, "invalid_cursor", fmt.Sprintf("%s must be an event id: an integer >= 0.", name))
	}
	return n, nil
}

// handleAgents is GET /api/towns/{townId}/agents.
func (s *Server) handleAgents(w http.ResponseWriter, r *http.Request) {
	town := r.PathValue("townId")
	if aerr := s.viewerOf(r, town); aerr != nil {
		writeError(w, aerr)
		return
	}
	agents, err := s.store.Agents(r.Context(), town)
	if err != nil {
		s.storeFailed(w, r, "agents", err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"agents": agents})
}

// storeFailed answers a request whose store call failed. A call that failed
// because the client went away (its context ended) is not a store failure:
// it is neither logged as one nor counted, so that store errors and their
// metric mean the store failed.
func (s *Server) storeFailed(w http.ResponseWriter, r *http.Request, op string, err error) {
	if r.Context().Err() != nil {
		s.log.Debug("request ended by its client", "op", op, "err", err)
		writeError(w, errorf(http.StatusServiceUnavailable, "client_gone", "The request was cancelled."))
		return
	}
	s.metrics.storeErrors.WithLabelValues(op).Inc()
	s.log.Error("store", "op", op, "err", err)
	// A disk that fills, a database that restarts: worth a retry soon.
	retryAfter(w, 2*time.Second)
	writeError(w, errorf(http.StatusServiceUnavailable, "store_unavailable", "The event store is not answering; retry."))
}
