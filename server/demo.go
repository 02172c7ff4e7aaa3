package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/agentstream/agentstream/model"
)

// DemoTown and DemoRig are where `serve --demo` agents live.
const (
	DemoTown = "demo"
	DemoRig  = "demo-rig"
)

// RecordedEvent is one line of a recorded session: an event and when, after
// the session started, the agent emitted it.
type RecordedEvent struct {
	AtMS int64           `json:"at_ms"`
	Type string          `json:"type"`
	Data json.RawMessage `json:"data"`
}

// ParseSession reads a recorded session (JSON lines). Times must not go
// backwards, and the session must end with agent.exited, so a replay ends
// the way a real agent's stream does.
func ParseSession(b []byte) ([]RecordedEvent, error) {
	var out []RecordedEvent
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, MaxBodyBytes)
	for n := 1; sc.Scan(); n++ {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var e RecordedEvent
		if err := json.Unmarshal(line, &e); err != nil {
			return nil, fmt.Errorf("session line %d: %w", n, err)
		}
		if msg := checkType(e.Type); msg != "" {
			return nil, fmt.Errorf("session line %d: %s", n, msg)
		}
		if len(out) > 0 && e.AtMS < out[len(out)-1].AtMS {
			return nil, fmt.Errorf("session line %d: at_ms goes backwards", n)
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("session: %w", err)
	}
	if len(out) == 0 || out[len(out)-1].Type != model.TypeExited {
		return nil, fmt.Errorf("session must end with %s", model.TypeExited)
	}
	return out, nil
}

// Demo replays recorded sessions into the store as agents of DemoTown, one
// after another, at their recorded pace, until its context ends.
type Demo struct {
	Store    *model.Store
	Sessions [][]RecordedEvent
	Log      *slog.Logger
	// Pause is the time between one agent's exit and the next one's start.
	Pause time.Duration
}

// Run replays until ctx ends. Each replay is a new agent, named for the time
// it started so that ids stay unique across server restarts.
func (d *Demo) Run(ctx context.Context) error {
	for n := 0; ; n++ {
		session := d.Sessions[n%len(d.Sessions)]
		agent := fmt.Sprintf("demo-%s", time.Now().UTC().Format("20060102-150405.000"))
		d.Log.Info("demo agent starting", "town", DemoTown, "rig", DemoRig, "agent", agent, "events", len(session))
		if err := d.replay(ctx, agent, session); err != nil {
			return err
		}
		select {
		case <-time.After(d.Pause):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (d *Demo) replay(ctx context.Context, agent string, session []RecordedEvent) error {
	start := time.Now()
	t := time.NewTimer(0)
	defer t.Stop()
	for _, rec := range session {
		t.Reset(time.Until(start.Add(time.Duration(rec.AtMS) * time.Millisecond)))
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
		data := rec.Data
		if data == nil {
			data = json.RawMessage("{}")
		}
		ev := []model.Event{{TownID: DemoTown, RigID: DemoRig, AgentID: agent, Type: rec.Type, Data: data}}
		if err := d.Store.Append(ctx, ev); err != nil {
			return fmt.Errorf("demo append: %w", err)
		}
	}
	return nil
}
