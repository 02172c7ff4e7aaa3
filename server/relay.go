package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/server/container"
)

// TypeUpstreamGap is the event a relay stores where a container's ring
// had already dropped events it never read: the loss is written down, not
// silent.
const TypeUpstreamGap = "upstream.gap"

// relayPage is how many events one pull asks a container for. Smaller than
// the ring, so that one answer stays a few MiB even with long lines.
const relayPage = 100

// Relay brings a container's agents into the store (`serve --upstream`). It
// is the scheduler's poll.Upstream: when an active agent's feed pulls (see
// poll.Upstream for when), it calls Pull, which asks the container for
// the events after the last one stored and commits them, tagged with their
// run and sequence number, before the feed reads and fans them out. Watch
// keeps every agent the container reports running active
// (poll.Scheduler.Hold), watched or not, so late joiners find its whole
// history; it lets go once the agent's agent.exited is stored.
//
// A relay is the one writer of its agents' upstream events in this
// process: pulls of one agent never overlap, and each run's cursor is read
// back from the store, so nothing is stored twice across restarts. Relays
// of other instances may pull the same container into the same database:
// the store skips relayed events already stored (see model.Store.Append),
// so each is stored once, by whichever commits it first.
type Relay struct {
	client *container.Client
	store  *model.Store
	town   string
	rig    string
	log    *slog.Logger

	relayed prometheus.Counter
	lost    prometheus.Counter

	// holdUntil (Unix ns) is when the container may next be asked, after
	// it answered with Retry-After.
	holdUntil atomic.Int64

	mu     sync.Mutex
	agents map[string]*relayAgent
}

// relayAgent is one container agent as the relay follows it.
type relayAgent struct {
	pull sync.Mutex // one pull at a time, even across a feed's restart

	// Guarded by Relay.mu.
	run     string // the run seq counts in; "" until the first pull
	seq     int64  // the last sequence number stored for run
	release func() // the hold on its feed, while it has one
	lastRun string // from the container's list: the current run ...
	lastSeq int64  // ... and its last sequence number
	exited  bool   // ... and whether it has exited
}

// NewRelay returns a Relay that stores the agents of the container client
// talks to as agents of town and rig.
func NewRelay(client *container.Client, store *model.Store, town, rig string, log *slog.Logger) *Relay {
	if log == nil {
		log = slog.Default()
	}
	return &Relay{
		client: client, store: store, town: town, rig: rig, log: log.With("upstream", client.URL),
		relayed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentstream_relay_events_total", Help: "Events copied from the upstream container into the store."}),
		lost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentstream_relay_lost_events_total", Help: "Events the upstream container dropped from its ring before the relay read them."}),
		agents: map[string]*relayAgent{},
	}
}

// Collectors are the relay's metrics.
func (r *Relay) Collectors() []prometheus.Collector { return []prometheus.Collector{r.relayed, r.lost} }

// Pull copies k's new events from the container into the store and says how
// many it copied. Agents of other towns are not its own; an agent the
// container does not know has nothing to copy.
func (r *Relay) Pull(ctx context.Context, k model.AgentKey) (int, error) {
	if k.Town != r.town || r.held() {
		return 0, nil
	}
	r.mu.Lock()
	a := r.agents[k.Agent]
	if a == nil {
		// Watched before Watch has listed it: a fast agent's first events
		// must not wait for the list.
		a = &relayAgent{}
		r.agents[k.Agent] = a
	}
	r.mu.Unlock()
	a.pull.Lock()
	defer a.pull.Unlock()
	k = model.AgentKey{Town: r.town, Agent: k.Agent}
	pulled := 0
	for {
		r.mu.Lock()
		run, seq := a.run, a.seq
		r.mu.Unlock()
		page, err := r.client.Events(ctx, k.Agent, seq, relayPage)
		if err != nil {
			r.backOff(err)
			return pulled, fmt.Errorf("relay %s: %w", k.Agent, err)
		}
		if page.Run == "" {
			return pulled, nil // dropped from the container, or not started yet
		}
		if page.Run != run {
			// A run not seen since this process started: resume where
			// the store says, and ask again from there.
			stored, err := r.store.UpstreamSeq(ctx, k, page.Run)
			if err != nil {
				return pulled, err
			}
			r.mu.Lock()
			a.run, a.seq = page.Run, stored
			r.mu.Unlock()
			continue
		}
		if len(page.Events) == 0 {
			return pulled, nil
		}
		evs := make([]model.Event, 0, len(page.Events)+1)
		if first := page.Events[0].Seq; first > seq+1 {
			// The ring moved past us: say what was lost, once (it takes
			// the last lost sequence number, so it is never stored twice).
			data, _ := json.Marshal(map[string]any{"run": run, "first_lost_seq": seq + 1, "last_lost_seq": first - 1})
			evs = append(evs, model.Event{Type: TypeUpstreamGap, Data: data, CreatedAt: page.Events[0].Time, UpstreamSeq: first - 1})
			r.lost.Add(float64(first - 1 - seq))
			r.log.Warn("upstream dropped events before they were read", "agent", k.Agent, "run", run, "first", seq+1, "last", first-1)
		}
		for _, e := range page.Events {
			l := container.Fit(container.Line{Type: e.Type, Data: e.Data}, MaxDataBytes)
			evs = append(evs, model.Event{Type: l.Type, Data: l.Data, CreatedAt: e.Time, UpstreamSeq: e.Seq})
		}
		for i := range evs {
			evs[i].TownID, evs[i].RigID, evs[i].AgentID, evs[i].UpstreamRun = r.town, r.rig, k.Agent, run
		}
		if err := r.store.Append(ctx, evs); err != nil {
			return pulled, fmt.Errorf("relay %s: %w", k.Agent, err)
		}
		r.relayed.Add(float64(len(page.Events)))
		pulled += len(page.Events)
		r.mu.Lock()
		a.seq = page.Events[len(page.Events)-1].Seq
		r.mu.Unlock()
		if len(page.Events) < relayPage {
			return pulled, nil
		}
	}
}

// Watch lists the container's agents every interval until ctx ends. It keeps
// each one's feed active (sched.Hold) from when it is first seen until its
// last event, agent.exited included, is stored, and has the feed pull at
// once when the list shows events it has not stored. It holds nothing once
// it returns.
func (r *Relay) Watch(ctx context.Context, sched *poll.Scheduler, interval time.Duration) {
	defer r.releaseAll()
	t := time.NewTicker(interval)
	defer t.Stop()
	failing := false // log a failure once, not at every tick of an outage
	for {
		err := r.sync(ctx, sched)
		switch {
		case ctx.Err() != nil:
		case err != nil && !failing:
			r.log.Warn("upstream unreachable; retrying", "err", err)
			failing = true
		case err == nil && failing:
			r.log.Info("upstream reachable again")
			failing = false
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

// held reports whether the container asked, by Retry-After, not to be
// called yet.
func (r *Relay) held() bool { return time.Now().UnixNano() < r.holdUntil.Load() }

// backOff honours the Retry-After of a container's answer, if it has one:
// no list and no pull asks it again before then.
func (r *Relay) backOff(err error) {
	var ae *container.APIError
	if errors.As(err, &ae) && ae.RetryAfter > 0 {
		r.holdUntil.Store(time.Now().Add(ae.RetryAfter).UnixNano())
	}
}

func (r *Relay) sync(ctx context.Context, sched *poll.Scheduler) error {
	if r.held() {
		return nil
	}
	list, err := r.client.Agents(ctx)
	if err != nil {
		r.backOff(err)
		return err
	}
	seen := make(map[string]bool, len(list))
	// Releasing stops a feed and waits for it, and its Pull takes r.mu:
	// so releases happen after unlocking.
	var releases []func()
	defer func() {
		for _, release := range releases {
			release()
		}
	}()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, info := range list {
		seen[info.AgentID] = true
		a := r.agents[info.AgentID]
		if a == nil {
			a = &relayAgent{}
			r.agents[info.AgentID] = a
		}
		a.lastRun, a.lastSeq, a.exited = info.Run, info.LastSeq, info.State == container.StateExited
		behind := a.run != a.lastRun || a.seq < a.lastSeq
		caughtUp := a.exited && !behind
		switch {
		case caughtUp && a.release != nil:
			releases = append(releases, a.release)
			a.release = nil
		case !caughtUp && a.release == nil:
			release, err := sched.Hold(model.AgentKey{Town: r.town, Agent: info.AgentID})
			if err != nil {
				return err
			}
			a.release = release
		}
		if behind {
			// The list is the cheap "something new" signal: one request
			// for all agents, then a pull only where there is news.
			sched.PullNow(model.AgentKey{Town: r.town, Agent: info.AgentID})
		}
	}
	for id, a := range r.agents {
		if !seen[id] {
			// Gone from the container: nothing more to pull.
			if a.release != nil {
				releases = append(releases, a.release)
			}
			delete(r.agents, id)
		}
	}
	return nil
}

func (r *Relay) releaseAll() {
	var releases []func()
	r.mu.Lock()
	for _, a := range r.agents {
		if a.release != nil {
			releases = append(releases, a.release)
			a.release = nil
		}
	}
	r.mu.Unlock()
	for _, release := range releases {
		release()
	}
}
