package server

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/agentstream/agentstream/model"
)

// Ingest limits (DESIGN.md, API).
const (
	MaxBodyBytes = 1 << 20  // a request body
	MaxDataBytes = 64 << 10 // one event's data, compacted
	MaxBatch     = 1000     // events in one request
	MaxTypeLen   = model.MaxTypeLen
	MaxIDLen     = model.MaxIDLen // town, rig and agent ids
)

// Input is one event as an agent posts it.
type Input struct {
	AgentID string          `json:"agent_id"`
	Type    string          `json:"type"`
	Data    json.RawMessage `json:"data"`
}

type ingestBody struct {
	Input
	Events *[]Input `json:"events"`
}

// ParseIngest reads an ingest body: one event {"agent_id","type","data"} or a
// batch {"events":[...]}. Unknown fields, wrong types, trailing data, a bad
// type name, data over MaxDataBytes, and an empty or oversized batch are
// errors. A missing agent_id is left empty (the caller fills in the token's
// subject); a missing data becomes {}. Data is returned compacted, so that it
// fits on one SSE data line.
func ParseIngest(body []byte) ([]Input, error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, errorf(http.StatusBadRequest, "empty_body", "The request body is empty; send a JSON event or {\"events\":[...]}.")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var b ingestBody
	if err := dec.Decode(&b); err != nil {
		return nil, jsonError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errorf(http.StatusBadRequest, "invalid_json", "The body holds more than one JSON value.")
	}
	var in []Input
	if b.Events != nil {
		if b.AgentID != "" || b.Type != "" || b.Data != nil {
			return nil, errorf(http.StatusBadRequest, "invalid_body", "Send either one event or {\"events\":[...]}, not both.")
		}
		in = *b.Events
		if len(in) == 0 {
			return nil, errorf(http.StatusBadRequest, "empty_batch", "The events list is empty.")
		}
		if len(in) > MaxBatch {
			return nil, errorf(http.StatusBadRequest, "batch_too_large", fmt.Sprintf("A batch holds at most %d events; this one has %d.", MaxBatch, len(in)))
		}
	} else {
		in = []Input{b.Input}
	}
	for i := range in {
		if err := checkInput(&in[i]); err != nil {
			if len(in) > 1 {
				err.Message = fmt.Sprintf("events[%d]: %s", i, err.Message)
			}
			return nil, err
		}
	}
	return in, nil
}

func checkInput(e *Input) *apiError {
	if e.AgentID != "" {
		if msg := model.CheckID("agent_id", e.AgentID); msg != "" {
			return errorf(http.StatusBadRequest, "invalid_agent_id", msg)
		}
	}
	if msg := checkType(e.Type); msg != "" {
		return errorf(http.StatusBadRequest, "invalid_type", msg)
	}
	if e.Data == nil {
		e.Data = json.RawMessage("{}")
	}
	var buf bytes.Buffer
	buf.Grow(len(e.Data))
	if err := json.Compact(&buf, e.Data); err != nil {
		// The decoder already validated it; this is unreachable in practice.
		return errorf(http.StatusBadRequest, "invalid_json", "data is not valid JSON.")
	}
	if buf.Len() > MaxDataBytes {
		return errorf(http.StatusBadRequest, "data_too_large", fmt.Sprintf("data is %d bytes; at most %d are allowed.", buf.Len(), MaxDataBytes))
	}
	e.Data = buf.Bytes()
	return nil
}

// MaxIdempotencyKeyLen is the longest Idempotency-Key.
const MaxIdempotencyKeyLen = 128

// checkIdempotencyKey returns why key is not a valid Idempotency-Key (1 to
// 128 printable ASCII characters), or "".
func checkIdempotencyKey(key string) string {
	if key == "" || len(key) > MaxIdempotencyKeyLen {
		return fmt.Sprintf("Idempotency-Key must be 1 to %d printable characters; this one is %d.", MaxIdempotencyKeyLen, len(key))
	}
	for _, c := range []byte(key) {
		if c < 0x20 || c > 0x7e {
			return "Idempotency-Key must be printable ASCII characters."
		}
	}
	return ""
}

// checkType returns why typ is not a valid event type, or "".
func checkType(typ string) string { return model.CheckType(typ) }

// jsonError turns a decoding error into the API's words for it.
func jsonError(err error) *apiError {
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return errorf(http.StatusBadRequest, "invalid_body", "The body must be a JSON object.")
		}
		return errorf(http.StatusBadRequest, "invalid_field_type", fmt.Sprintf("Field %q must be %s, not %s.", typeErr.Field, jsonKind(typeErr.Type.Kind().String()), typeErr.Value))
	case errors.As(err, &syntaxErr), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return errorf(http.StatusBadRequest, "invalid_json", "The body is not valid JSON: "+err.Error()+".")
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return errorf(http.StatusBadRequest, "unknown_field", fmt.Sprintf("Unknown field %s.", strings.TrimPrefix(err.Error(), "json: unknown field ")))
	}
	return errorf(http.StatusBadRequest, "invalid_json", "The body is not valid JSON: "+err.Error()+".")
}

func jsonKind(goKind string) string {
	switch goKind {
	case "string":
		return "a string"
	case "slice":
		return "an array"
	case "struct", "ptr":
		return "an object"
	}
	return goKind
}

// handleIngest is POST /api/rigs/{rigId}/agent-events.
func (s *Server) handleIngest(w http.ResponseWriter, r *http.Request) {
	if s.isDraining() {
		// Stop taking work at once; with its Idempotency-Key a client's
		// retry elsewhere or after the restart is safe.
		w.Header().Set("Connection", "close")
		retryAfter(w, time.Second)
		writeError(w, errShuttingDown)
		return
	}
	c, aerr := s.auth.authenticate(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	rig := r.PathValue("rigId")
	if aerr := checkIDs("rig", rig); aerr != nil {
		writeError(w, aerr)
		return
	}
	if c.Scope != ScopeAgent {
		writeError(w, errorf(http.StatusForbidden, "wrong_scope", "Posting events needs an agent token."))
		return
	}
	if c.Rig != rig {
		writeError(w, errorf(http.StatusForbidden, "wrong_rig", fmt.Sprintf("This token is for rig %q, not %q.", c.Rig, rig)))
		return
	}
	key, hasKey := r.Header.Get("Idempotency-Key"), len(r.Header.Values("Idempotency-Key")) > 0
	if hasKey {
		if msg := checkIdempotencyKey(key); msg != "" {
			writeError(w, errorf(http.StatusBadRequest, "invalid_idempotency_key", msg))
			return
		}
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		writeError(w, errorf(http.StatusUnsupportedMediaType, "unsupported_media_type", "Send the body as Content-Type: application/json."))
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, errorf(http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("The body is over %d bytes.", MaxBodyBytes)))
			return
		}
		if isTimeout(err) {
			w.Header().Set("Connection", "close")
			writeError(w, errorf(http.StatusRequestTimeout, "body_timeout",
				fmt.Sprintf("The body did not arrive whole within %s.", s.limits.BodyTimeout)))
			return
		}
		writeError(w, errorf(http.StatusBadRequest, "invalid_body", "The body could not be read."))
		return
	}
	in, err := ParseIngest(body)
	if err != nil {
		writeError(w, err.(*apiError))
		return
	}
	events := make([]model.Event, len(in))
	for i, e := range in {
		agent := e.AgentID
		if agent == "" {
			agent = c.Subject
		}
		if agent != c.Subject {
			writeError(w, errorf(http.StatusForbidden, "wrong_agent", fmt.Sprintf("This token posts as agent %q, not %q.", c.Subject, agent)))
			return
		}
		events[i] = model.Event{TownID: c.Town, RigID: rig, AgentID: agent, Type: e.Type, Data: e.Data}
	}
	if ok, wait := s.rate.take(townAgentKey{c.Town, c.Subject}, len(events), len(body)); !ok {
		s.metrics.rateLimited.Inc()
		tooMany(w, wait, "rate_limited", fmt.Sprintf("Agent %q is posting faster than %g events or %d bytes a second; retry after the time in Retry-After.",
			c.Subject, s.limits.IngestEvents, int(s.limits.IngestBytes)))
		return
	}
	start := time.Now()
	replayed := false
	if hasKey {
		sum := sha256.Sum256(body)
		replayed, err = s.store.AppendOnce(r.Context(), events, model.Once{Key: key, Hash: hex.EncodeToString(sum[:])})
	} else {
		err = s.store.Append(r.Context(), events)
	}
	s.metrics.appendSeconds.Observe(time.Since(start).Seconds())
	if errors.Is(err, model.ErrKeyReused) {
		writeError(w, errorf(http.StatusUnprocessableEntity, "idempotency_key_reused",
			"This Idempotency-Key was used with another request body for this agent; use a new key for a new batch."))
		return
	}
	var conflict *model.RigConflictError
	if errors.As(err, &conflict) {
		writeError(w, errorf(http.StatusConflict, "agent_in_other_rig",
			fmt.Sprintf("Agent %q of town %q belongs to rig %q; a token of rig %q cannot post as it.", conflict.Agent, conflict.Town, conflict.Rig, conflict.Posted)))
		return
	}
	if err != nil {
		s.storeFailed(w, r, "append", err)
		return
	}
	if replayed {
		// The answer the first request got; nothing was stored now.
		w.Header().Set("Idempotent-Replayed", "true")
	} else {
		s.metrics.ingested.Add(float64(len(events)))
	}
	ids := make([]int64, len(events))
	for i := range events {
		ids[i] = events[i].ID
	}
	writeJSON(w, http.StatusCreated, map[string]any{"ids": ids})
}
