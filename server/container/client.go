package container

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Client calls a container's control API; the relay of `serve --upstream`
// uses it.
type Client struct {
	URL    string       // base URL, e.g. http://127.0.0.1:8090
	Secret string       // the container's bearer secret
	HTTP   *http.Client // default http.DefaultClient
}

// APIError is an error answer of the control API.
type APIError struct {
	Status  int
	Code    string
	Message string
	// RetryAfter is the answer's Retry-After, in seconds, or 0.
	RetryAfter time.Duration
}

func (e *APIError) Error() string {
	return fmt.Sprintf("container: %d %s: %s", e.Status, e.Code, e.Message)
}

// Agents lists the container's agents.
func (c *Client) Agents(ctx context.Context) ([]AgentInfo, error) {
	var out struct {
		Agents []AgentInfo `json:"agents"`
	}
	err := c.do(ctx, http.MethodGet, "/agents", nil, &out)
	return out.Agents, err
}

// Events returns up to limit events of agent id after seq (limit 0: the
// container's default).
func (c *Client) Events(ctx context.Context, id string, after int64, limit int) (Page, error) {
	q := url.Values{"after": {fmt.Sprint(after)}}
	if limit > 0 {
		q.Set("limit", fmt.Sprint(limit))
	}
	var p Page
	err := c.do(ctx, http.MethodGet, "/agents/"+url.PathEscape(id)+"/events?"+q.Encode(), nil, &p)
	return p, err
}

// Start starts an agent.
func (c *Client) Start(ctx context.Context, req StartRequest) (AgentInfo, error) {
	var info AgentInfo
	err := c.do(ctx, http.MethodPost, "/agents", req, &info)
	return info, err
}

// Stop asks the container to stop an agent.
func (c *Client) Stop(ctx context.Context, id string) (AgentInfo, error) {
	var info AgentInfo
	err := c.do(ctx, http.MethodDelete, "/agents/"+url.PathEscape(id), nil, &info)
	return info, err
}

// ParseRetryAfter reads a Retry-After header given in seconds; anything
// else (absent, a date, garbage) is 0. It is capped at ten minutes, so a
// bad peer cannot park a client for good.
func ParseRetryAfter(v string) time.Duration {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n <= 0 {
		return 0
	}
	return min(time.Duration(n)*time.Second, 10*time.Minute)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.URL, "/")+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.Secret)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<30))
	if err != nil {
		return fmt.Errorf("container: %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var e struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		json.Unmarshal(b, &e)
		return &APIError{Status: resp.StatusCode, Code: e.Error.Code, Message: e.Error.Message,
			RetryAfter: ParseRetryAfter(resp.Header.Get("Retry-After"))}
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("container: %s %s: %w", method, path, err)
	}
	return nil
}
