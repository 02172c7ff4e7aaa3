package server

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/transport"
)

// demoBodies are the recorded demo sessions as ingest bodies, one per
// session, each a batch of its events.
func demoBodies(t testing.TB) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("..", "testdata", "demo", "*.jsonl"))
	if err != nil || len(files) == 0 {
		t.Fatalf("demo sessions: %v", err)
	}
	var bodies []string
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		var evs []string
		sc := bufio.NewScanner(fh)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			var line struct {
				Type string          `json:"type"`
				Data json.RawMessage `json:"data"`
			}
			if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
				t.Fatal(err)
			}
			if line.Type == model.TypeExited {
				continue // the town stream goes on; the agent's would end
			}
			b, _ := json.Marshal(line)
			evs = append(evs, string(b))
		}
		fh.Close()
		bodies = append(bodies, `{"events":[`+strings.Join(evs, ",")+`]}`)
	}
	return bodies
}

// texts assembles what a client shows from what it received: per part,
// its deltas joined in order.
type texts map[string]string

func (tx texts) add(m json.RawMessage) {
	var ev model.Event
	if json.Unmarshal(m, &ev) != nil {
		return
	}
	if part, delta, ok := deltaOf(&ev); ok {
		tx[part] += delta
	}
}

// readRaw reads n events of a stream as raw JSON, with their ids.
func readRaw(t *testing.T, c streamClient, n int) (ids []int64, raw []json.RawMessage) {
	t.Helper()
	for range n {
		m, data, err := nextRaw(c)
		if err != nil {
			t.Fatalf("after %d of %d: %v", len(ids), n, err)
		}
		if m.Notice != "" {
			t.Fatalf("unexpected notice %+v", m)
		}
		ids = append(ids, m.ID)
		raw = append(raw, data)
	}
	return ids, raw
}

// TestCompactDeltas: on every transport, a late joiner of the town's
// stream with ?compact=deltas gets the demo sessions' backfill with each
// run of text deltas merged: fewer events, and the same text assembled as
// a client without compaction assembles, also when it is cut off at random
// points and resumes with its last id. Live deltas arrive one by one.
func TestCompactDeltas(t *testing.T) {
	e := newEnvWith(t, Options{}, model.Options{Retain: -1})
	for i, body := range demoBodies(t) {
		e.postRig("r1", fmt.Sprintf("a%d", i+1), body)
	}
	all := e.townEvents(t)
	want := texts{}
	for _, ev := range all {
		b, _ := json.Marshal(ev)
		want.add(b)
	}
	for _, kind := range transports {
		t.Run(kind, func(t *testing.T) {
			got := texts{}
			rng := rand.New(rand.NewPCG(3, uint64(len(kind))))
			var cursor int64
			received := 0
			for cursor < all[len(all)-1].ID {
				c, code := e.openTown(kind, "compact=deltas", cursor)
				if c == nil {
					t.Fatalf("open: %d", code)
				}
				ids, raw := readRaw(t, c, 1)
				for n := rng.IntN(12); n > 0 && ids[len(ids)-1] < all[len(all)-1].ID; n-- {
					i, r := readRaw(t, c, 1)
					ids, raw = append(ids, i...), append(raw, r...)
				}
				c.Close()
				for i := range ids {
					if ids[i] <= cursor {
						t.Fatalf("id %d after cursor %d", ids[i], cursor)
					}
					cursor = ids[i]
					got.add(raw[i])
				}
				received += len(ids)
			}
			if received >= len(all) {
				t.Fatalf("compacted backfill: %d events for %d stored", received, len(all))
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("compacted text differs from the plain text:\n%v\nwant\n%v", got, want)
			}

			// Live: each delta arrives as it is posted, not merged.
			now := e.townEvents(t)
			c, _ := e.openTown(kind, "compact=deltas", now[len(now)-1].ID)
			defer c.Close()
			for i := range 3 {
				id := e.postRig("r1", "a1", fmt.Sprintf(`{"type":%q,"data":{"message_id":"m9","part":{"id":"p9"},"delta":"%d"}}`, typePartUpdated, i))[0]
				if ids, raw := readRaw(t, c, 1); ids[0] != id || !strings.Contains(string(raw[0]), fmt.Sprintf(`"delta":"%d"`, i)) {
					t.Fatalf("live delta %d: got %d %s, want %d unmerged", i, ids[0], raw[0], id)
				}
			}
		})
	}
}

// TestCompactPage: the REST read with ?compact=deltas merges a page's runs
// of deltas and keeps its cursor; the text assembled page by page is the
// plain one. A bad compact value is a 400.
func TestCompactPage(t *testing.T) {
	e := newEnvWith(t, Options{}, model.Options{Retain: -1})
	e.postRig("r1", "a1", demoBodies(t)[0])
	read := func(query string) (texts, int) {
		tx := texts{}
		n := 0
		after := int64(0)
		for {
			code, _, v := e.do("GET", fmt.Sprintf("/api/rigs/r1/agents/a1/events?limit=25&after_id=%d%s", after, query), e.viewer, "", nil)
			if code != 200 {
				t.Fatalf("read: %d %v", code, v)
			}
			for _, ev := range v["events"].([]any) {
				b, _ := json.Marshal(ev)
				tx.add(b)
				n++
			}
			after = int64(v["next_after_id"].(float64))
			if !v["has_more"].(bool) {
				return tx, n
			}
		}
	}
	plain, n := read("")
	compacted, m := read("&compact=deltas")
	if m >= n || fmt.Sprint(plain) != fmt.Sprint(compacted) {
		t.Fatalf("compacted pages: %d events (plain %d), texts equal: %v", m, n, fmt.Sprint(plain) == fmt.Sprint(compacted))
	}
	if code, body := e.get("/api/rigs/r1/agents/a1/events?compact=all", map[string]string{"Authorization": "Bearer " + e.viewer}); code != 400 || !strings.Contains(body, "invalid_compact") {
		t.Fatalf("compact=all: %d %s", code, body)
	}
}

// BenchmarkCompactDemo: the bytes of the demo sessions' events as a late
// joiner receives them (SSE frames), plain and with ?compact=deltas.
func BenchmarkCompactDemo(b *testing.B) {
	if current.Cluster != nil {
		b.Skip("no database involved: measured on the SQLite pass only")
	}
	var evs []model.Event
	for i, body := range demoBodies(b) {
		var batch struct{ Events []model.Event }
		if err := json.Unmarshal([]byte(body), &batch); err != nil {
			b.Fatal(err)
		}
		for _, ev := range batch.Events {
			ev.ID = int64(len(evs) + 1)
			ev.TownID, ev.RigID, ev.AgentID = "demo", "demo-rig", fmt.Sprintf("a%d", i+1)
			evs = append(evs, ev)
		}
	}
	encode := encoders()[transport.FormatSSE]
	size := func(items []*poll.Item) (n int) {
		for _, it := range items {
			n += len(encode(&it.Event))
		}
		return n
	}
	items := make([]*poll.Item, len(evs))
	var plain, compacted, events int
	for b.Loop() {
		for i := range evs {
			items[i] = &poll.Item{Event: evs[i]}
		}
		plain = size(items)
		out := compactDeltas(items, evs[len(evs)-1].ID)
		compacted, events = size(out), len(out)
	}
	b.ReportMetric(float64(plain), "plain-bytes")
	b.ReportMetric(float64(compacted), "compact-bytes")
	b.ReportMetric(float64(len(evs)), "plain-events")
	b.ReportMetric(float64(events), "compact-events")
}
