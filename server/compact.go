package server

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
)

// typePartUpdated is the event an agent's text arrives in, a delta at a
// time: data {"message_id", "part": {"id", "text", ...}, "delta"}, where
// part.text is the part's whole text so far and delta what this event added.
const typePartUpdated = "message.part.updated"

// parseCompact reads ?compact=: "" or "deltas".
func parseCompact(q url.Values) (bool, *apiError) {
	switch q.Get("compact") {
	case "":
		return false, nil
	case "deltas":
		return true, nil
	}
	return false, errorf(http.StatusBadRequest, "invalid_compact", `compact takes one value: "deltas".`)
}

// partDelta is what compaction reads of a message.part.updated event.
type partDelta struct {
	MessageID string `json:"message_id"`
	Part      struct {
		ID string `json:"id"`
	} `json:"part"`
	Delta *string `json:"delta"`
}

// deltaOf returns the part an event adds a delta to, and the delta; ok is
// false for any other event.
func deltaOf(ev *model.Event) (part string, delta string, ok bool) {
	if ev.Type != typePartUpdated {
		return "", "", false
	}
	var d partDelta
	if json.Unmarshal(ev.Data, &d) != nil || d.Part.ID == "" || d.Delta == nil {
		return "", "", false
	}
	return ev.TownID + "\x00" + ev.AgentID + "\x00" + d.MessageID + "\x00" + d.Part.ID, *d.Delta, true
}

// compactDeltas merges each run of adjacent message.part.updated events of
// one part, among those with ids up to through, into one event: the last
// of the run, with "delta" set to the run's deltas joined. Its part.text is
// already the whole text, and its id the last one's, so a client that
// resumes after it misses nothing and sees nothing twice, and the text a
// client assembles from deltas is the same as without compaction. Only
// adjacent events merge: an event in between, of any agent, ends a run,
// since a client may resume after it. items is rewritten in place.
func compactDeltas(items []*poll.Item, through int64) []*poll.Item {
	out := items[:0]
	for i := 0; i < len(items); {
		it := items[i]
		part, delta, ok := deltaOf(&it.Event)
		if !ok || it.ID > through {
			out = append(out, it)
			i++
			continue
		}
		j := i + 1
		var joined strings.Builder
		for ; j < len(items) && items[j].ID <= through; j++ {
			p, d, ok := deltaOf(&items[j].Event)
			if !ok || p != part {
				break
			}
			if joined.Len() == 0 {
				joined.WriteString(delta)
			}
			joined.WriteString(d)
		}
		if j == i+1 {
			out = append(out, it)
			i++
			continue
		}
		last := items[j-1].Event
		last.Data = withDelta(last.Data, joined.String())
		out = append(out, &poll.Item{Event: last})
		i = j
	}
	clear(items[len(out):])
	return out
}

// withDelta returns data, a JSON object, with its "delta" member set to d.
func withDelta(data json.RawMessage, d string) json.RawMessage {
	var m map[string]json.RawMessage
	if json.Unmarshal(data, &m) != nil {
		return data
	}
	m["delta"], _ = json.Marshal(d)
	out, err := json.Marshal(m)
	if err != nil {
		return data
	}
	return out
}
