package model

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/uptrace/bun"
)

// notifyChannel is the channel commits are announced on.
const notifyChannel = "agentstream_events"

// maxNotifyPayload keeps a notification under PostgreSQL's 8000-byte
// payload limit; a group naming more agents says "*", any agent.
const maxNotifyPayload = 7000

// notify sends one NOTIFY for the group, in its transaction, so it is
// delivered at the commit and only if the commit happens. One per group,
// never per event: a transaction that notifies takes a database-wide lock
// at commit, so notifications are kept as few as the commits.
func (d postgresDialect) notify(ctx context.Context, tx bun.Tx, agents []AgentKey) error {
	if len(agents) == 0 {
		return nil
	}
	var b strings.Builder
	head := "@" + d.origin + "\n"
	b.WriteString(head)
	for _, k := range agents {
		if b.Len()+len(k.Town)+len(k.Agent)+2 > maxNotifyPayload {
			b.Reset()
			b.WriteString(head)
			b.WriteString("*")
			break
		}
		b.WriteString(k.Town)
		b.WriteByte('/')
		b.WriteString(k.Agent)
		b.WriteByte('\n')
	}
	if _, err := tx.ExecContext(ctx, "SELECT pg_notify(?, ?)", notifyChannel, b.String()); err != nil {
		return fmt.Errorf("notify: %w", err)
	}
	return nil
}

// parseNotify reads a notification's payload back into the store it came
// from and its agents; nil means any agent.
func parseNotify(payload string) (origin string, keys []AgentKey) {
	if rest, ok := strings.CutPrefix(payload, "@"); ok {
		origin, payload, _ = strings.Cut(rest, "\n")
	}
	if payload == "*" {
		return origin, nil
	}
	for line := range strings.SplitSeq(strings.TrimSuffix(payload, "\n"), "\n") {
		town, agent, ok := strings.Cut(line, "/")
		if ok {
			keys = append(keys, AgentKey{Town: town, Agent: agent})
		}
	}
	return origin, keys
}

// listen holds one connection of its own in LISTEN. Ids and agents are
// case sensitive and never hold "/" or a newline (CheckID), so the payload
// needs no escaping.
func (d postgresDialect) listen(ctx context.Context, log *slog.Logger, fn func([]AgentKey)) error {
	wait := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := d.listenOnce(ctx, fn, func() { wait = 100 * time.Millisecond })
		if ctx.Err() != nil {
			break
		}
		log.Warn("LISTEN connection lost; feeds poll until it is back", "err", err, "retry_in", wait)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
		}
		wait = min(2*wait, 5*time.Second)
	}
	return ctx.Err()
}

// listenOnce listens on one connection until it fails. Once listening it
// calls connected, and fn(nil): what was committed while no connection
// listened was not announced to this one.
func (d postgresDialect) listenOnce(ctx context.Context, fn func([]AgentKey), connected func()) error {
	conn, err := pgx.Connect(ctx, d.dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel); err != nil {
		return err
	}
	connected()
	fn(nil)
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		origin, keys := parseNotify(n.Payload)
		if origin == d.origin {
			continue // this store's own commit, pushed through OnCommit
		}
		fn(keys)
	}
}
