// Package model holds agentstream's persistent data: the agent_events table,
// its bun model, and the Store that appends to it and reads it back in cursor
// order.
//
// Cursors are event ids. They come from an AUTOINCREMENT primary key, so an id
// is never handed out twice, even after the rows below it are pruned; a client
// that resumes "after id N" can rely on that.
package model

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/uptrace/bun"
)

// Event is one row of agent_events: something an agent did, in the order the
// store committed it.
type Event struct {
	bun.BaseModel `bun:"table:agent_events"`

	ID        int64           `bun:"id,pk,autoincrement"`
	TownID    string          `bun:"town_id,notnull"`
	RigID     string          `bun:"rig_id,notnull"`
	AgentID   string          `bun:"agent_id,notnull"`
	Type      string          `bun:"type,notnull"`
	Data      json.RawMessage `bun:"data,type:text,notnull"`
	CreatedAt time.Time       `bun:"created_at,notnull"`

	// UpstreamRun and UpstreamSeq name an event relayed from a container:
	// the process run it came from and its sequence number there. They are
	// unique per agent, which is how a relay never stores an event twice,
	// across its own restarts too. Events written here leave them empty.
	UpstreamRun string `bun:"upstream_run,nullzero"`
	UpstreamSeq int64  `bun:"upstream_seq,nullzero"`
}

// PruneMark records, per agent of a town, the id up to which retention has
// deleted its events. It is what tells a client whose cursor is older that
// it missed events (a gap), rather than letting it skip them silently.
type PruneMark struct {
	bun.BaseModel `bun:"table:agent_prune_marks"`

	TownID        string `bun:"town_id,pk"`
	AgentID       string `bun:"agent_id,pk"`
	PrunedThrough int64  `bun:"pruned_through,notnull"`
}

// Agent is the binding of an agent of a town to its rig, made by the
// agent's first event. It is what stops a token of another rig of the same
// town from writing into the agent's stream (or ending it).
type Agent struct {
	bun.BaseModel `bun:"table:agents"`

	TownID    string    `bun:"town_id,pk"`
	AgentID   string    `bun:"agent_id,pk"`
	RigID     string    `bun:"rig_id,notnull"`
	CreatedAt time.Time `bun:"created_at,notnull"`
}

// RigConflictError is Append's error for events of an agent that is bound
// to another rig of its town. None of the request's events are stored.
type RigConflictError struct {
	Town, Agent string
	Rig         string // the rig the agent is bound to
	Posted      string // the rig the refused events named
}

func (e *RigConflictError) Error() string {
	return fmt.Sprintf("agent %q of town %q belongs to rig %q, not %q", e.Agent, e.Town, e.Rig, e.Posted)
}

// TimeFormat is how created_at is written on the wire: RFC 3339 in UTC with
// milliseconds, so that clients in any language parse it and sort it as text.
const TimeFormat = "2006-01-02T15:04:05.000Z07:00"

// wireEvent is Event as every API and stream format writes it.
type wireEvent struct {
	ID        int64           `json:"id"`
	TownID    string          `json:"town_id"`
	RigID     string          `json:"rig_id"`
	AgentID   string          `json:"agent_id"`
	Type      string          `json:"type"`
	Data      json.RawMessage `json:"data"`
	CreatedAt string          `json:"created_at"`
}

// MarshalJSON writes the event in its one wire shape (see DESIGN.md).
func (e Event) MarshalJSON() ([]byte, error) {
	data := e.Data
	if len(data) == 0 {
		data = json.RawMessage("null")
	}
	return json.Marshal(wireEvent{
		ID:        e.ID,
		TownID:    e.TownID,
		RigID:     e.RigID,
		AgentID:   e.AgentID,
		Type:      e.Type,
		Data:      data,
		CreatedAt: e.CreatedAt.UTC().Format(TimeFormat),
	})
}

// UnmarshalJSON reads the wire shape back, for clients of the API.
func (e *Event) UnmarshalJSON(b []byte) error {
	var w wireEvent
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	t, err := time.Parse(time.RFC3339Nano, w.CreatedAt)
	if err != nil && w.CreatedAt != "" {
		return err
	}
	*e = Event{ID: w.ID, TownID: w.TownID, RigID: w.RigID, AgentID: w.AgentID, Type: w.Type, Data: w.Data, CreatedAt: t}
	return nil
}

// AgentKey names one agent's stream. Rig may be empty, meaning any rig of the
// town. Town is always set, so that one town never reads another's events
// even when agent ids collide. Agent empty names the whole town: every
// event of every agent of the town, in id order (a town stream).
type AgentKey struct {
	Town  string
	Rig   string
	Agent string
}

// IsTown reports whether k names a whole town rather than one agent.
func (k AgentKey) IsTown() bool { return k.Agent == "" }

// AgentSummary is what the agent list shows: an agent and its latest event.
type AgentSummary struct {
	AgentID     string    `json:"agent_id"`
	RigID       string    `json:"rig_id"`
	LastEventID int64     `json:"last_event_id"`
	LastType    string    `json:"last_type"`
	LastEventAt time.Time `json:"-"`
	Exited      bool      `json:"exited"`
	// From the agent.exited event's data, when the agent has exited.
	ExitReason string `json:"exit_reason,omitempty"`
	ExitCode   *int   `json:"exit_code,omitempty"`
}

// MarshalJSON writes last_event_at in the wire time format.
func (a AgentSummary) MarshalJSON() ([]byte, error) {
	type plain AgentSummary
	return json.Marshal(struct {
		plain
		LastEventAt string `json:"last_event_at"`
	}{plain(a), a.LastEventAt.UTC().Format(TimeFormat)})
}

// TypeExited is the event type that ends an agent's stream.
const TypeExited = "agent.exited"

// MaxTypeLen is the longest event type.
const MaxTypeLen = 128

// CheckType returns why typ is not a valid event type (1 to MaxTypeLen
// characters of a-z, 0-9, '.', '_' and '-'), or "" when it is. Every writer
// of events checks it, so that types are safe as SSE event names, metric
// labels and CSS classes alike.
func CheckType(typ string) string {
	if typ == "" {
		return "type is required: 1 to 128 characters of a-z, 0-9, '.', '_' and '-'."
	}
	if len(typ) > MaxTypeLen {
		return fmt.Sprintf("type is %d characters; at most %d are allowed.", len(typ), MaxTypeLen)
	}
	for _, c := range []byte(typ) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Sprintf("type %q has a character outside a-z, 0-9, '.', '_' and '-'.", typ)
		}
	}
	return ""
}

// MaxIDLen is the longest town, rig or agent id.
const MaxIDLen = 128

// CheckID returns why id is not a valid town, rig or agent id, or "" when
// it is: 1 to MaxIDLen characters of A-Z, a-z, 0-9, '.', '_', ':', '@',
// '+' and '-'. Such an id stands in a URL path, a log line, a metric label
// or a file name as it is, with no escaping to get wrong. what names the
// id in the message ("agent_id", "town").
func CheckID(what, id string) string {
	if id == "" {
		return what + " is required: 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':', '@', '+' and '-'."
	}
	if len(id) > MaxIDLen {
		return fmt.Sprintf("%s is %d bytes; at most %d are allowed.", what, len(id), MaxIDLen)
	}
	for _, c := range []byte(id) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '.' || c == '_' || c == ':' || c == '@' || c == '+' || c == '-') {
			return fmt.Sprintf("%s %q has a character outside A-Z, a-z, 0-9, '.', '_', ':', '@', '+' and '-'.", what, id)
		}
	}
	return ""
}
