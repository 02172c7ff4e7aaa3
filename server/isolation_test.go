package server

import (
	"fmt"
	"testing"

	"github.com/agentstream/agentstream/model"
)

// TestRigCannotPostAsAnotherRigsAgent: within one town, a token of rig r2
// for agent a1 can neither inject events into r1's a1 nor end its stream;
// the stream goes on and a reconnect is not refused with 204.
func TestRigCannotPostAsAnotherRigsAgent(t *testing.T) {
	e := newEnv(t)
	for _, kind := range []string{"sse-h1", "ws"} {
		t.Run(kind, func(t *testing.T) {
			first := e.mustPost(e.agent, `{"type":"session.created"}`)
			c, code := e.open(kind, "a1", first[0]-1)
			if code/100 != 2 && code != 101 {
				t.Fatalf("open: %d", code)
			}
			defer c.Close()
			if got := readN(t, c, 1); got[0] != first[0] {
				t.Fatalf("backfill %v, want %v", got, first)
			}
			intruder := e.mustMintAgent("t1", "r2", "a1")
			for _, body := range []string{`{"type":"message.part.updated","data":{"delta":"injected"}}`, exited} {
				code, _, v := e.do("POST", "/api/rigs/r2/agent-events", intruder, "application/json", []byte(body))
				if code != 409 || errCode(v) != "agent_in_other_rig" {
					t.Fatalf("r2 posting as r1's a1: %d %v, want 409 agent_in_other_rig", code, v)
				}
			}
			// The next event the stream sees is r1's own.
			own := e.mustPost(e.agent, `{"type":"step"}`)
			m, err := c.Next()
			if err != nil || m.ID != own[0] || m.Type != "step" {
				t.Fatalf("stream after the refused posts: %+v %v, want r1's event %d", m, err, own[0])
			}
			c2, code := e.open(kind, "a1", own[0])
			if code == 204 {
				t.Fatal("reconnect refused with 204: the stream was ended by another rig")
			}
			c2.Close()
		})
	}
	if got := e.rows(t, "rig_id = 'r2'"); got != 0 {
		t.Fatalf("%d events of rig r2 stored", got)
	}
}

// rows counts agent_events rows matching where.
func (e *testEnv) rows(t *testing.T, where string) int {
	t.Helper()
	n, err := e.store.DB().NewSelect().Model((*model.Event)(nil)).Where(where).Count(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return int(n)
}

// TestTownsDoNotPruneEachOther: town beta's agent posting far past the
// retention limit prunes nothing of town acme's agent of the same id, whose
// history, list entry and open stream stay as they were.
func TestTownsDoNotPruneEachOther(t *testing.T) {
	e := newEnvWith(t, Options{}, model.Options{Retain: 20})
	acme := e.mustMintAgent("t1", "r1", "coder-1")
	mine := e.mustPost(acme, steps(10))
	c, _ := e.open("sse-h1", "coder-1", 0)
	defer c.Close()
	readN(t, c, 10)

	beta := e.mustMintAgent("beta", "r1", "coder-1")
	for range 4 {
		e.mustPost(beta, steps(500))
	}
	if err := e.store.Prune(t.Context()); err != nil {
		t.Fatal(err)
	}
	code, _, v := e.do("GET", "/api/rigs/r1/agents/coder-1/events?limit=100", e.viewer, "", nil)
	if code != 200 || len(v["events"].([]any)) != 10 || v["gap"] != nil {
		t.Fatalf("acme's coder-1 after beta's 2000 events: %d %v", code, v)
	}
	code, _, v = e.do("GET", "/api/towns/t1/agents", e.viewer, "", nil)
	if list, _ := v["agents"].([]any); code != 200 || len(list) != 1 {
		t.Fatalf("acme's agent list: %d %v", code, v)
	}
	// The open stream hears no gap; its next event is acme's next one.
	next := e.mustPost(acme, `{"type":"step"}`)
	m, err := c.Next()
	if err != nil || m.Notice != "" || m.ID != next[0] {
		t.Fatalf("acme's stream: %+v %v, want event %d", m, err, next[0])
	}
	if m.ID <= mine[len(mine)-1] {
		t.Fatalf("event %d came again", m.ID)
	}
}

// TestReadOnlyThatRigsAgent: the REST read under another rig's path shows
// nothing of an agent bound to r1.
func TestReadOnlyThatRigsAgent(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(3))
	for _, tc := range []struct {
		rig  string
		want int
	}{{"r1", 3}, {"r2", 0}} {
		code, _, v := e.do("GET", fmt.Sprintf("/api/rigs/%s/agents/a1/events", tc.rig), e.viewer, "", nil)
		if evs, _ := v["events"].([]any); code != 200 || len(evs) != tc.want {
			t.Fatalf("read under rig %s: %d %v, want %d events", tc.rig, code, v, tc.want)
		}
	}
}
