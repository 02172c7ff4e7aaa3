package server

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
)

// Limits of a stream filter: enough for any dashboard, small enough that
// matching an event stays a few comparisons.
const (
	maxFilterAgents = 100
	maxFilterTypes  = 32
)

// filter narrows a stream to some rigs, agents and type prefixes. The zero
// filter passes everything. Filtering happens per subscriber on the feed's
// shared items: the feed, and each event's encoding, stay one per town.
type filter struct {
	rigs   []string
	agents []string
	types  []string // prefixes: "agent." passes agent.exited, "step" passes step and steps
}

// parseFilter reads ?rig=, ?agent= and ?types= (each repeatable; types also
// comma-separated). town says whether the stream is a town's: rig and agent
// filters only mean something there.
func parseFilter(q url.Values, town bool) (filter, *apiError) {
	var f filter
	for _, v := range q["types"] {
		for _, p := range strings.Split(v, ",") {
			if p == "" {
				continue
			}
			// A prefix is a type, or a type's start ending in '.'.
			if msg := model.CheckType(strings.TrimSuffix(p, ".")); msg != "" {
				return f, errorf(http.StatusBadRequest, "invalid_filter", "types: "+msg)
			}
			f.types = append(f.types, p)
		}
	}
	f.rigs, f.agents = q["rig"], q["agent"]
	if !town && (len(f.rigs) > 0 || len(f.agents) > 0) {
		return f, errorf(http.StatusBadRequest, "invalid_filter",
			"rig and agent filters are for a town's stream (/api/towns/{townId}/stream); this stream is one agent's.")
	}
	for _, id := range f.rigs {
		if aerr := checkIDs("rig", id); aerr != nil {
			return f, aerr
		}
	}
	for _, id := range f.agents {
		if aerr := checkIDs("agent", id); aerr != nil {
			return f, aerr
		}
	}
	if len(f.agents)+len(f.rigs) > maxFilterAgents || len(f.types) > maxFilterTypes {
		return f, errorf(http.StatusBadRequest, "invalid_filter",
			fmt.Sprintf("At most %d rig and agent filters and %d type prefixes.", maxFilterAgents, maxFilterTypes))
	}
	return f, nil
}

// empty reports whether f passes everything.
func (f *filter) empty() bool { return len(f.rigs)+len(f.agents)+len(f.types) == 0 }

// agentPasses reports whether f lets events of this rig and agent through.
func (f *filter) agentPasses(rig, agent string) bool {
	return (len(f.rigs) == 0 || slices.Contains(f.rigs, rig)) &&
		(len(f.agents) == 0 || slices.Contains(f.agents, agent))
}

func (f *filter) passes(ev *model.Event) bool {
	if !f.agentPasses(ev.RigID, ev.AgentID) {
		return false
	}
	if len(f.types) == 0 {
		return true
	}
	for _, p := range f.types {
		if strings.HasPrefix(ev.Type, p) {
			return true
		}
	}
	return false
}

// apply keeps the items f passes, in place, and returns them.
func (f *filter) apply(items []*poll.Item) []*poll.Item {
	if f.empty() {
		return items
	}
	kept := items[:0]
	for _, it := range items {
		if f.passes(&it.Event) {
			kept = append(kept, it)
		}
	}
	clear(items[len(kept):])
	return kept
}
