package transport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/r3labs/sse/v2"
	// r3labs/sse's own backoff package: its client takes this BackOff for
	// ReconnectStrategy and stops retrying on this PermanentError.
	"gopkg.in/cenkalti/backoff.v1"
)

// ErrEnded is returned by Follow when the server says the stream is over
// (204: the cursor is at or past the agent's exit).
var ErrEnded = errors.New("stream ended")

// FollowOptions configure Follow.
type FollowOptions struct {
	URL   string // the stream's full URL
	Token string // a viewer token, sent as Bearer on every (re)connect
	After int64  // resume after this id
	// OnEvent receives each event's id and JSON; returning true means the
	// stream is over for the caller (it saw agent.exited), so the end of
	// the response that follows is not a reason to reconnect.
	OnEvent func(id int64, data []byte) (done bool)
	// OnNotice receives notices such as "gap".
	OnNotice func(name string, data []byte)
	// OnReconnect, if set, is told of every retry and its delay.
	OnReconnect func(err error, wait time.Duration)
	Client      *http.Client // default: a client with no overall timeout
}

// Follow reads an SSE stream until the caller is done with it, ctx ends, or
// the server refuses it for good, reconnecting after any disconnect with the
// last id it saw (Last-Event-ID), so nothing is lost and nothing repeats.
//
// It is built on r3labs/sse's client, which keeps Last-Event-ID and backs
// off between attempts. Where that client falls short, this fills in:
//   - events up to 64 KiB of data and more: its default line buffer is
//     64 KiB, so the buffer is raised to 2 MiB;
//   - 204 No Content means "over", not "retry": its default treats every
//     non-200 as a failure to retry, so a ResponseValidator makes 204 (and
//     401/403/400/404, which no retry mends) permanent;
//   - a response that ends cleanly is "done" for it, even when the server
//     was only restarting: Follow reconnects unless OnEvent said it was done;
//   - its default backoff gives up after 15 minutes: this one never does
//     (capped at 30 s between attempts) until ctx ends.
func Follow(ctx context.Context, o FollowOptions) error {
	c := sse.NewClient(o.URL, sse.ClientMaxBufferSize(2<<20))
	if o.Client != nil {
		c.Connection = o.Client
	}
	c.Headers["Authorization"] = "Bearer " + o.Token
	if o.After > 0 {
		c.LastEventID.Store([]byte(strconv.FormatInt(o.After, 10)))
	}
	c.ResponseValidator = validate
	done := false
	handler := func(m *sse.Event) {
		if done {
			return
		}
		if len(m.Event) > 0 {
			if o.OnNotice != nil {
				o.OnNotice(string(m.Event), m.Data)
			}
			return
		}
		if len(m.Data) == 0 {
			return
		}
		id, _ := strconv.ParseInt(string(m.ID), 10, 64)
		done = o.OnEvent(id, m.Data)
	}
	for {
		bo := backoff.NewExponentialBackOff()
		bo.InitialInterval = 500 * time.Millisecond
		bo.MaxInterval = 30 * time.Second
		bo.MaxElapsedTime = 0
		c.ReconnectStrategy = backoff.WithContext(bo, ctx)
		c.ReconnectNotify = func(err error, d time.Duration) {
			if o.OnReconnect != nil {
				o.OnReconnect(err, d)
			}
		}
		err := c.SubscribeRawWithContext(ctx, handler)
		switch {
		case done:
			return nil
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			return err
		}
		// A clean end without the caller being done: the server went away
		// (shutdown); reconnect from the last id.
		if o.OnReconnect != nil {
			o.OnReconnect(errors.New("stream ended by the server"), 0)
		}
	}
}

func validate(_ *sse.Client, resp *http.Response) error {
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNoContent {
		return backoff.Permanent(ErrEnded)
	}
	var e struct {
		Error struct{ Code, Message string }
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	json.Unmarshal(body, &e)
	err := fmt.Errorf("%s: %s %s", resp.Status, e.Error.Code, e.Error.Message)
	switch resp.StatusCode {
	case http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound:
		return backoff.Permanent(err)
	}
	return err
}
