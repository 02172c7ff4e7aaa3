package server

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/agentstream/agentstream/server/container"
)

// IngestClient posts one agent's events to a server's ingest API. It is the
// container.Sink of `agentstream run`.
type IngestClient struct {
	URL   string // the server's base URL, e.g. http://127.0.0.1:8080
	Token string // an agent token; the events are posted as its subject
	Rig   string
	HTTP  *http.Client // default: one with a 30 s timeout
	// RetryFor bounds how long one batch is retried while the server is
	// unreachable or answers 429 or 5xx; default 1 min.
	RetryFor time.Duration
	// OnRetry, if set, hears of each failed attempt that will be retried.
	OnRetry func(err error, wait time.Duration)
	// Stop, if set, is closed when retrying must end (the user pressed
	// Ctrl-C): a failed attempt is then not retried, and a wait for the
	// next one is cut short, so Send returns the failure at once.
	Stop <-chan struct{}
}

// Send posts batch as one request, retrying transient failures. An answer
// that says the request is wrong (a 4xx other than 429) is not retried. A
// 429 or 503 with Retry-After is retried no sooner than it says.
//
// Every batch carries an Idempotency-Key of its own, and its retries the
// same one: a retry after a response was lost on the way back gets the
// first answer, and the batch is stored once.
func (c *IngestClient) Send(ctx context.Context, batch []container.Line) error {
	type in struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	}
	evs := make([]in, len(batch))
	for i, l := range batch {
		evs[i] = in{l.Type, l.Data}
	}
	body, err := json.Marshal(map[string]any{"events": evs})
	if err != nil {
		return err
	}
	var raw [16]byte
	crand.Read(raw[:])
	key := hex.EncodeToString(raw[:])
	retryFor := c.RetryFor
	if retryFor <= 0 {
		retryFor = time.Minute
	}
	deadline := time.Now().Add(retryFor)
	wait := 100 * time.Millisecond
	for {
		err := c.post(ctx, body, key)
		if err == nil {
			return nil
		}
		if ae, ok := err.(*apiError); ok && ae.Status != http.StatusTooManyRequests && ae.Status < 500 {
			return err
		}
		select {
		case <-c.Stop: // nil: never
			return err
		default:
		}
		if time.Now().Add(wait).After(deadline) {
			return fmt.Errorf("gave up after %s: %w", retryFor, err)
		}
		jittered := wait/2 + rand.N(wait)
		if ae, ok := err.(*apiError); ok && ae.retryAfter > jittered {
			jittered = ae.retryAfter
			if time.Now().Add(jittered).After(deadline) {
				return fmt.Errorf("gave up after %s: %w", retryFor, err)
			}
		}
		if c.OnRetry != nil {
			c.OnRetry(err, jittered)
		}
		select {
		case <-time.After(jittered):
		case <-c.Stop:
			return err
		case <-ctx.Done():
			return err
		}
		wait = min(2*wait, 5*time.Second)
	}
}

func (c *IngestClient) post(ctx context.Context, body []byte, key string) error {
	u := strings.TrimRight(c.URL, "/") + "/api/rigs/" + url.PathEscape(c.Rig) + "/agent-events"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode == http.StatusCreated {
		return nil
	}
	var e struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	json.Unmarshal(b, &e)
	if e.Error.Code == "" {
		e.Error.Code, e.Error.Message = "http_"+fmt.Sprint(resp.StatusCode), strings.TrimSpace(string(b))
	}
	return &apiError{Status: resp.StatusCode, Code: e.Error.Code, Message: e.Error.Message,
		retryAfter: container.ParseRetryAfter(resp.Header.Get("Retry-After"))}
}
