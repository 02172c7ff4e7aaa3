package poll

import (
	"context"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentstream/agentstream/model"
)

// feed is the one reader of an active agent. Its goroutine is the only
// writer of cursor and ring; subscribers read them under mu.
type feed struct {
	s     *Scheduler
	key   model.AgentKey
	wake  chan struct{} // capacity 1: a pending "poll now"
	kick  chan struct{} // capacity 1: a pending "pull the upstream now"
	ready chan struct{} // closed once cursor holds the agent's latest id
	ctx   context.Context
	stop  context.CancelFunc
	done  chan struct{} // closed when run returns

	nusers  int         // subscribers and holds; guarded by s.mu
	stopped atomic.Bool // set by shutdown, under mu, before it kicks the live subscribers

	// Commits made in this process, pushed by Scheduler.Committed, for
	// the feed's goroutine to fan out without a read.
	pmu      sync.Mutex
	pending  []pushed
	overflow bool // pending grew past maxPending and was dropped: read instead
	// dirty says that another writer may have added events: the next wake
	// reads the Source (set by poke).
	dirty atomic.Bool
	// synced is the town's id through which the feed has every event of
	// its key (read, or history before it started); -1 until it knows.
	// Written by the feed's goroutine; read by the sweep.
	synced atomic.Int64

	mu     sync.Mutex
	cursor int64 // highest id fanned out; everything <= cursor is in the Source
	ring   ring  // the newest items fanned out
	live   []*Subscription
	subs   map[*Subscription]struct{} // every open subscription, live or catching up
}

func newFeed(s *Scheduler, k model.AgentKey) *feed {
	ctx, cancel := context.WithCancel(context.Background())
	f := &feed{
		s:     s,
		key:   k,
		wake:  make(chan struct{}, 1),
		kick:  make(chan struct{}, 1),
		ready: make(chan struct{}),
		ctx:   ctx,
		stop:  cancel,
		done:  make(chan struct{}),
		ring:  newRing(s.opts.RingLen, s.opts.RingBytes),
		subs:  make(map[*Subscription]struct{}),
	}
	f.synced.Store(-1)
	return f
}

func (f *feed) pullNow() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// poke has the feed read its Source: events may have been added that no
// push will bring.
func (f *feed) poke() {
	f.dirty.Store(true)
	f.signal()
}

func (f *feed) signal() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// pushed is what a feed gets of one commit (model.Commit): the events of
// its key, and where the commit stands in its town's chain.
type pushed struct {
	events []model.Event // the key's, in id order
	// start is where the town's chain of commits began (see
	// Scheduler.Committed): every event of the town above it, up to this
	// commit, came in commits pushed before this one.
	start int64
	last  int64 // the town's highest id in the commit
}

// maxPending bounds the commits a feed holds unread: a feed that far
// behind drops them and reads its Source once instead.
const maxPending = 256

// push queues a commit for the feed's goroutine. It never blocks.
func (f *feed) push(p pushed) {
	f.pmu.Lock()
	switch {
	case len(f.pending) >= maxPending:
		clear(f.pending)
		f.pending, f.overflow = f.pending[:0], true
	case !f.overflow:
		f.pending = append(f.pending, p)
	}
	f.pmu.Unlock()
	f.signal()
}

// step brings the feed up to date after a wake: from the commits pushed
// to it when they follow on from what it has, else by reading its Source.
func (f *feed) step() error {
	f.pmu.Lock()
	groups, overflow := f.pending, f.overflow
	f.pending, f.overflow = nil, false
	f.pmu.Unlock()
	if !f.dirty.Swap(false) && !overflow && f.apply(groups) {
		return nil
	}
	return f.poll()
}

// apply fans out the key's events of the commits, in order, as long as
// each follows on from what the feed has: the feed has every event of its
// key through the start of the commit's chain, and the chain brought it
// every one since, in order. It reports false at the first that does not
// (a commit of another writer came between, unseen): the feed must read
// its Source.
func (f *feed) apply(groups []pushed) bool {
	for _, g := range groups {
		synced := f.synced.Load()
		if synced < 0 || synced < g.start {
			return false
		}
		// What a read since the commit brought is not new.
		i := 0
		for i < len(g.events) && g.events[i].ID <= f.cursor {
			i++
		}
		if i < len(g.events) {
			f.publish(g.events[i:], false)
		}
		f.synced.Store(max(synced, g.last))
	}
	return true
}

// shutdown stops the feed and waits for its goroutine; subscribers still
// attached (only after Scheduler.Close) are woken to see ErrClosed.
func (f *feed) shutdown() {
	f.mu.Lock()
	f.stopped.Store(true)
	for _, sub := range f.live {
		sub.wakeUp()
	}
	f.live = nil
	f.mu.Unlock()
	f.stop()
	<-f.done
}

func (f *feed) run() {
	defer close(f.done)
	log := f.s.opts.Logger.With("town", f.key.Town, "agent", f.key.Agent)
	// Start at the agent's newest event: history is each subscriber's own
	// catch-up, the feed only carries what comes next.
	for {
		// The town's newest first: every event of the key up to it is
		// then history, at or before the key's newest read next.
		townLatest, err := f.townLatest()
		latest := townLatest
		if err == nil && !f.key.IsTown() {
			latest, err = f.s.src.Latest(f.ctx, f.key)
		}
		if err == nil {
			f.mu.Lock()
			f.cursor = latest
			f.ring.base = latest
			f.mu.Unlock()
			f.synced.Store(max(townLatest, latest))
			close(f.ready)
			break
		}
		if f.ctx.Err() != nil {
			return
		}
		log.Error("feed start", "err", err)
		select {
		case <-time.After(f.s.opts.Interval):
		case <-f.ctx.Done():
			return
		}
	}
	up := f.s.opts.Upstream
	if f.key.IsTown() {
		// The agents' own feeds pull (the relay holds one per running
		// agent); their commits poke this one.
		up = nil
	}
	var pullC <-chan time.Time // nil, so never ready, without an upstream
	var pullT *time.Timer
	if up != nil {
		pullT = time.NewTimer(0) // a new feed pulls at once: its first subscriber waits for nothing
		defer pullT.Stop()
		pullC = pullT.C
	}
	var pullErr string // the last pull error logged: an outage is logged once
	// A failed poll is tried again after an interval: the events it did
	// not read may never be named again by a notify or the sweep.
	retry := time.NewTimer(0)
	retry.Stop()
	defer retry.Stop()
	for {
		pull := false
		select {
		case <-f.wake:
		case <-retry.C:
		case <-pullC:
			pull = true
		case <-f.kick:
			pull = up != nil
		case <-f.ctx.Done():
			return
		}
		if pull {
			// A failed pull still lets the step below deliver what the
			// Source has; the next one tries again.
			n, err := up.Pull(f.ctx, f.key)
			switch {
			case err != nil && f.ctx.Err() == nil:
				f.s.Metrics.pollErrors.Inc()
				if err.Error() != pullErr {
					log.Error("feed pull", "err", err)
					pullErr = err.Error()
				}
			case err == nil && pullErr != "":
				log.Info("feed pull works again")
				pullErr = ""
			}
			next := f.s.opts.Interval
			if n > 0 {
				next = f.s.opts.BusyInterval
			}
			pullT.Reset(next)
			// The pull's own commit was pushed to the feed before Pull
			// returned, and woke it: the step below takes it.
			select {
			case <-f.wake:
			default:
			}
		}
		if err := f.step(); err != nil && f.ctx.Err() == nil {
			f.s.Metrics.pollErrors.Inc()
			log.Error("feed poll", "err", err)
			f.dirty.Store(true)
			retry.Reset(f.s.opts.Interval)
		}
	}
}

// townLatest is the newest id of the feed's town.
func (f *feed) townLatest() (int64, error) {
	return f.s.src.Latest(f.ctx, model.AgentKey{Town: f.key.Town})
}

// poll reads everything after the cursor, a page at a time, and fans it
// out. Having read the town's newest id first, it then has every event of
// its key through that id too (synced).
func (f *feed) poll() error {
	townLatest, err := f.townLatest()
	if err != nil {
		return err
	}
	for first := true; ; first = false {
		f.s.Metrics.polls.Inc()
		evs, err := f.s.src.After(f.ctx, f.key, f.cursor, f.s.opts.PageSize)
		if err != nil {
			return err
		}
		if len(evs) == 0 {
			f.synced.Store(max(f.synced.Load(), townLatest, f.cursor))
			return nil
		}
		lost := false
		if m := f.s.opts.MinRetained; first && m > 0 && len(evs) >= min(m, f.s.opts.PageSize) {
			// Only a feed this far behind can have had events pruned
			// before it read them (retention keeps each agent's newest
			// MinRetained, all of them after the cursor then).
			if lost, err = f.prunedPast(f.cursor); err != nil {
				return err
			}
		}
		f.publish(evs, lost)
		if len(evs) < f.s.opts.PageSize {
			f.synced.Store(max(f.synced.Load(), townLatest, f.cursor))
			return nil
		}
	}
}

// publish fans events out to every live subscriber. A subscriber whose queue
// is full is taken off the live path (it catches up by itself later), so
// publish never waits for anyone.
//
// afterLoss says that events before evs were pruned before the feed read
// them: its live subscribers, who would not see those, are first demoted,
// to catch up from the Source, which tells each its gap; and the ring
// starts over before evs, since it no longer holds every event after its
// old base. Both in the critical section of the fan-out: a demoted
// subscriber must not rejoin the live path at the old cursor before evs go
// out.
func (f *feed) publish(evs []model.Event, afterLoss bool) {
	items := itemsFor(make([]*Item, 0, len(evs)), evs)
	now := time.Now()
	budget := f.s.opts.StreamBytes
	f.mu.Lock()
	if afterLoss {
		for len(f.live) > 0 {
			f.demote(len(f.live) - 1)
		}
		clear(f.ring.buf)
		f.ring.start, f.ring.n, f.ring.bytes, f.ring.base = 0, 0, 0, evs[0].ID-1
	}
	for _, it := range items {
		f.ring.push(it)
		f.cursor = it.ID
	}
	for j := 0; j < len(f.live); {
		// A subscriber whose queue does not take the whole batch keeps
		// what it took and catches up on the rest.
		if !f.live[j].enqueue(items, budget, f.s.opts.QueueLen) {
			f.demote(j)
			continue
		}
		j++
	}
	// Once per batch, not per event: a reader woken by the first event
	// would find only that one.
	for _, sub := range f.live {
		sub.wakeUp()
	}
	f.mu.Unlock()
	for i := range evs {
		f.s.Metrics.lag.Observe(now.Sub(evs[i].CreatedAt).Seconds())
	}
}

// prunedPast reports whether retention has deleted events of the feed's
// agent (of any agent of its town, for a town feed) with ids above cursor.
func (f *feed) prunedPast(cursor int64) (bool, error) {
	if f.key.IsTown() {
		ts, ok := f.s.src.(TownSource)
		if !ok {
			return false, nil
		}
		marks, err := ts.PrunedAfter(f.ctx, f.key.Town, cursor)
		return len(marks) > 0, err
	}
	pruned, err := f.s.src.PrunedThrough(f.ctx, f.key)
	return pruned > cursor, err
}

// behindMarks sets marks[i] to the id below which a subscriber's cursor
// leaves it more than over[i] events behind the feed: the id of the
// (over[i]+1)th newest item of the ring, or the ring's base when the ring
// holds exactly over[i] (an event at base exists, and is one more), or
// math.MinInt64 when the ring cannot tell. Called with mu held.
func (f *feed) behindMarks(over []int, marks []int64) {
	for i, n := range over {
		switch j := f.ring.n - 1 - n; {
		case j >= 0:
			marks[i] = f.ring.at(j).ID
		case j == -1:
			marks[i] = f.ring.base
		default:
			marks[i] = math.MinInt64
		}
	}
}

// demote takes live[j] off the live path. Called with mu held.
func (f *feed) demote(j int) {
	sub := f.live[j]
	last := len(f.live) - 1
	f.live[j] = f.live[last]
	f.live[last] = nil
	f.live = f.live[:last]
	sub.lagging.Store(true)
	sub.wakeUp()
}

// removeLive drops sub from the live path if it is there. Called with mu held.
func (f *feed) removeLive(sub *Subscription) {
	for j, s := range f.live {
		if s == sub {
			last := len(f.live) - 1
			f.live[j] = f.live[last]
			f.live[last] = nil
			f.live = f.live[:last]
			return
		}
	}
}

// ring holds the newest items fanned out, oldest first, at most len(buf)
// of them and at most maxBytes by Item.Cost (but always the newest one). It
// holds every event in (base, newest]; base rises as old items fall out.
type ring struct {
	buf      []*Item
	start    int
	n        int
	base     int64
	bytes    int64
	maxBytes int64
}

func newRing(size int, maxBytes int64) ring {
	return ring{buf: make([]*Item, size), maxBytes: maxBytes}
}

func (r *ring) at(i int) *Item { return r.buf[(r.start+i)%len(r.buf)] }

func (r *ring) push(it *Item) {
	cost := it.Cost()
	for r.n > 0 && (r.n == len(r.buf) || r.bytes+cost > r.maxBytes) {
		old := r.buf[r.start]
		r.base = old.ID
		r.bytes -= old.Cost()
		r.buf[r.start] = nil
		r.start = (r.start + 1) % len(r.buf)
		r.n--
	}
	r.buf[(r.start+r.n)%len(r.buf)] = it
	r.n++
	r.bytes += cost
}

// after appends to dst up to max items with id > cursor, and no more than
// maxBytes of them by Item.Cost (but at least one), if the ring holds every
// event after cursor; ok is false when it does not.
func (r *ring) after(dst []*Item, cursor int64, max int, maxBytes int64) (_ []*Item, ok bool) {
	if cursor < r.base {
		return dst, false
	}
	lo, hi := 0, r.n // first index with ID > cursor
	for lo < hi {
		m := (lo + hi) / 2
		if r.at(m).ID <= cursor {
			lo = m + 1
		} else {
			hi = m
		}
	}
	var size int64
	for i := lo; i < r.n && len(dst) < max; i++ {
		it := r.at(i)
		if size += it.Cost(); size > maxBytes && i > lo {
			break
		}
		dst = append(dst, it)
	}
	return dst, true
}
