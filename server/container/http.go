package container

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
)

const (
	maxBody  = 1 << 20 // a POST /agents body
	maxLimit = 1000    // events in one page; the ring is usually smaller
)

// Handler returns the control API (DESIGN.md, "Container control API"):
//
//	POST   /agents                    start an agent: StartRequest -> 201 AgentInfo
//	GET    /agents                    {"agents":[AgentInfo...]}
//	GET    /agents/{id}/events?after=N&limit=M   Page
//	DELETE /agents/{id}               stop an agent -> 202 AgentInfo (200 if it had exited)
//	GET    /healthz                   open
//
// Every route but /healthz needs "Authorization: Bearer <secret>", compared
// in constant time. Errors are {"error":{"code","message"}}, as on the
// server.
func (c *Container) Handler(secret string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /agents", c.handleStart)
	mux.HandleFunc("GET /agents", c.handleList)
	mux.HandleFunc("GET /agents/{id}/events", c.handleEvents)
	mux.HandleFunc("DELETE /agents/{id}", c.handleStop)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("No route %s %s.", r.Method, r.URL.Path))
	})
	want := []byte("Bearer " + secret)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
			return
		}
		got := []byte(r.Header.Get("Authorization"))
		if secret == "" || subtle.ConstantTimeCompare(got, want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="agentstream-container"`)
			writeError(w, http.StatusUnauthorized, "unauthorized", "Send the container secret as Authorization: Bearer <secret>.")
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func (c *Container) handleStart(w http.ResponseWriter, r *http.Request) {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		writeError(w, http.StatusUnsupportedMediaType, "unsupported_media_type", "Send the body as Content-Type: application/json.")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("The body is over %d bytes.", maxBody))
			return
		}
		writeError(w, http.StatusBadRequest, "invalid_body", "The body could not be read.")
		return
	}
	var req StartRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_json", "The body is not a valid start request: "+strings.TrimPrefix(err.Error(), "json: ")+".")
		return
	}
	if dec.More() {
		writeError(w, http.StatusBadRequest, "invalid_json", "The body holds more than one JSON value.")
		return
	}
	info, err := c.Start(req)
	switch {
	case err == nil:
		writeJSON(w, http.StatusCreated, info)
	case errors.Is(err, ErrRunning):
		writeError(w, http.StatusConflict, "agent_running", fmt.Sprintf("Agent %q is running; stop it first.", req.AgentID))
	case errors.Is(err, ErrBadRequest):
		writeError(w, http.StatusBadRequest, "invalid_request", sentence(strings.TrimPrefix(err.Error(), ErrBadRequest.Error()+": ")))
	case errors.Is(err, ErrClosed):
		writeError(w, http.StatusServiceUnavailable, "shutting_down", "The container is shutting down.")
	default:
		writeError(w, http.StatusInternalServerError, "start_failed", sentence(err.Error()))
	}
}

func (c *Container) handleList(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"agents": c.Agents()})
}

func (c *Container) handleEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	after, err := intParam(q.Get("after"), 0, 0, 1<<62)
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_cursor", "after must be an integer >= 0.")
		return
	}
	// A limit past the ring is no error: a client need not know its size.
	limit, err := intParam(q.Get("limit"), maxLimit, 1, maxLimit)
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_limit", fmt.Sprintf("limit must be an integer from 1 to %d.", maxLimit))
		return
	}
	writeJSON(w, http.StatusOK, c.Events(r.PathValue("id"), after, int(limit)))
}

func (c *Container) handleStop(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	info, err := c.Stop(id)
	switch {
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, "agent_not_found", fmt.Sprintf("No agent %q here.", id))
	case info.State == StateExited:
		writeJSON(w, http.StatusOK, info)
	default:
		writeJSON(w, http.StatusAccepted, info)
	}
}

// intParam parses a query value that must be an integer in [lo, hi]; an
// empty value is def.
func intParam(v string, def, lo, hi int64) (int64, error) {
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, errors.New("out of range")
	}
	return n, nil
}

// sentence makes an error a sentence: a capital first letter, unless the
// first word is a name as written on the wire (agent_id), and a period.
func sentence(s string) string {
	if s == "" {
		return s
	}
	if first, _, _ := strings.Cut(s, " "); !strings.ContainsAny(first, "_\"-") {
		s = strings.ToUpper(s[:1]) + s[1:]
	}
	if !strings.HasSuffix(s, ".") {
		s += "."
	}
	return s
}

func writeError(w http.ResponseWriter, status int, code, message string) {
	writeJSON(w, status, map[string]any{"error": map[string]string{"code": code, "message": message}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v) // only the package's own types
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}
