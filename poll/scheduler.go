// Package poll is the shared poll scheduler: one feed per active agent,
// however many subscribers it has, fanning the same events out to all of
// them.
//
// A feed learns of new events at once from commits made in this process
// (Scheduler.Notify, wired to the store's commit hook) and polls its Source
// on an interval for what other writers added. Subscribers get every event
// after their cursor exactly once, in id order: first history, then live.
// A subscriber that falls behind is taken off the live path and catches up
// on its own — from the feed's recent items, else from the Source — then
// rejoins, so a slow reader never slows the feed or anyone else, and costs
// at most its bounded queue.
package poll

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/agentstream/agentstream/model"
)

// Source is where feeds read events. The store implements it; an upstream
// container can too.
type Source interface {
	// After returns up to limit events of k with id > afterID, in id order.
	After(ctx context.Context, k model.AgentKey, afterID int64, limit int) ([]model.Event, error)
	// Latest returns the newest id of k, or 0.
	Latest(ctx context.Context, k model.AgentKey) (int64, error)
	// PrunedThrough returns the id up to which k's events may have been
	// deleted by retention, or 0: a cursor below it has missed events.
	PrunedThrough(ctx context.Context, k model.AgentKey) (int64, error)
}

// Upstream is another writer's buffer that feeds pull from, such as an
// agent container's ring of recent events. On each poll interval, before a
// feed reads its Source, it calls Pull, which copies the agent's new events
// from the upstream into the Source (persisting them, each once) and says
// how many: so they reach subscribers in the Source's order, after they are
// durable, and are there for late joiners. Pull is called only on its own
// timer, never for a local commit's notify, so an upstream sees one request
// per active agent per interval however many watch it.
type Upstream interface {
	Pull(ctx context.Context, k model.AgentKey) (n int, err error)
}

// DefaultStreamBytes is Options.StreamBytes's default.
const DefaultStreamBytes = 256 << 10

// BoundedSource is a Source that can bound a read by bytes as well as by
// count. Catch-up reads use it when the Source has it, so that a slow
// subscriber's batch stays within its StreamBytes.
type BoundedSource interface {
	// AfterBytes is After that stops once the events' data adds up to
	// maxBytes; it returns at least one event when there is one.
	AfterBytes(ctx context.Context, k model.AgentKey, afterID int64, limit int, maxBytes int64) ([]model.Event, error)
}

// TownSource is a Source that serves town feeds: keys with no agent, which
// follow every agent of a town in id order. Retention prunes each agent on
// its own, so what a town subscriber has missed is told per agent.
type TownSource interface {
	// PrunedAfter lists the agents of town whose events with ids above
	// afterID retention has deleted, each with the id it deleted through.
	PrunedAfter(ctx context.Context, town string, afterID int64) ([]model.PruneMark, error)
}

// ChangeSource is a Source that can say which agents of a town have
// events after an id. With it the scheduler learns of other writers'
// commits with one read per followed town each interval, however many of
// the town's agents are followed; without it, every feed reads its Source
// each interval.
type ChangeSource interface {
	// Changed returns the agents of town with events above afterID, each
	// with its highest id.
	Changed(ctx context.Context, town string, afterID int64) (map[string]int64, error)
}

// ErrClosed is returned by Subscription.Next after the scheduler is closed.
var ErrClosed = errors.New("poll: scheduler closed")

// Options tunes a Scheduler. The zero value is the default.
type Options struct {
	// Interval is how often the scheduler looks for events written by
	// others than this process's store (another instance), whose commits
	// no Notify reports: one ChangeSource read per town, or one Source
	// read per feed. Default 500 ms.
	Interval time.Duration
	QueueLen int // live items a subscriber may hold unread; default 64
	RingLen  int // recent items a feed keeps for catching up; default 1024
	PageSize int // events per Source read; default 1000
	// StreamBytes is what one subscriber may hold, by Item.Cost: its
	// unread live items and the batch it was last handed together. A
	// subscriber that would hold more is taken off the live path, and
	// catches up later in batches of at most this much. Default 256 KiB.
	// (A batch always has at least one event, however large.)
	StreamBytes int64
	// RingBytes bounds a feed's ring of recent items by Item.Cost, as
	// RingLen does by count; default 8 MiB.
	RingBytes int64
	Upstream  Upstream // pulled on each interval; nil: none
	// BusyInterval is the time to the next pull after a pull that brought
	// events; default Interval/5. A busy agent is read sooner, and before
	// a bounded upstream buffer wraps: with a 500-event ring, 500 ms
	// between pulls loses events past 1000/s, 100 ms past 5000/s. An
	// agent whose pulls bring nothing is pulled every Interval.
	BusyInterval time.Duration
	// MinRetained is how many of each agent's newest events retention
	// always keeps (model.Options.Retain); 0: it never prunes. A feed
	// whose poll reads at least that many events may have fallen so far
	// behind that retention deleted events before it read them: it then
	// checks, and has its subscribers catch up from the Source, which
	// tells each of its gap.
	MinRetained int
	Logger      *slog.Logger
}

func (o *Options) fill() {
	if o.Interval <= 0 {
		o.Interval = 500 * time.Millisecond
	}
	if o.BusyInterval <= 0 {
		o.BusyInterval = o.Interval / 5
	}
	o.BusyInterval = min(o.BusyInterval, o.Interval)
	if o.QueueLen <= 0 {
		// Small: it is allocated for every subscriber, idle or not, and a
		// subscriber that falls behind catches up from the ring anyway.
		o.QueueLen = 64
	}
	if o.RingLen <= 0 {
		o.RingLen = 1024
	}
	if o.PageSize <= 0 {
		o.PageSize = 1000
	}
	if o.StreamBytes <= 0 {
		o.StreamBytes = DefaultStreamBytes
	}
	if o.RingBytes <= 0 {
		o.RingBytes = 8 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Scheduler owns the feeds.
type Scheduler struct {
	src     Source
	opts    Options
	Metrics *Metrics

	mu     sync.RWMutex
	feeds  map[model.AgentKey]*feed
	closed bool

	stopSweep context.CancelFunc
	swept     chan struct{} // closed when sweep returns

	chainMu sync.Mutex
	chains  map[string]chain // per town written: see Committed
}

// chain is a run of a town's commits pushed one after another.
type chain struct{ start, last int64 }

// New returns a Scheduler reading src. Close stops it.
func New(src Source, opts Options) *Scheduler {
	opts.fill()
	s := &Scheduler{src: src, opts: opts, feeds: make(map[model.AgentKey]*feed), swept: make(chan struct{}),
		chains: make(map[string]chain)}
	s.Metrics = newMetrics(s)
	ctx, cancel := context.WithCancel(context.Background())
	s.stopSweep = cancel
	go s.sweep(ctx)
	return s
}

// sweep pokes, every Interval, the feeds that other writers have given
// something to read: the feeds of the agents a ChangeSource names, and of
// their towns, given the highest id seen in each town so far, unless they
// hold those events already (this process's own commits, pushed to them);
// every feed when the Source cannot name them.
//
// Ids within a town are committed in order (the store assigns them under
// the town's lock), so "above the highest id seen" misses none of a
// town's events, however the towns' commits interleave.
func (s *Scheduler) sweep(ctx context.Context) {
	defer close(s.swept)
	cs, _ := s.src.(ChangeSource)
	seen := map[string]int64{} // per followed town: the highest id seen
	t := time.NewTicker(s.opts.Interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
		s.mu.RLock()
		towns := make(map[string][]*feed)
		for k, f := range s.feeds {
			towns[k.Town] = append(towns[k.Town], f)
		}
		s.mu.RUnlock()
		for town := range seen {
			if towns[town] == nil {
				delete(seen, town)
			}
		}
		// A chain nobody follows need not be kept: one starts again at the
		// town's next commit, which a feed started later reads up to anyway.
		s.chainMu.Lock()
		for town := range s.chains {
			if towns[town] == nil {
				delete(s.chains, town)
			}
		}
		s.chainMu.Unlock()
		for town, feeds := range towns {
			last, known := seen[town]
			if cs == nil || !known {
				// A town newly followed: its feeds read everything after
				// their cursors once, and its changes count from here.
				if cs != nil {
					latest, err := s.src.Latest(ctx, model.AgentKey{Town: town})
					if err != nil {
						continue
					}
					seen[town] = latest
				}
				for _, f := range feeds {
					f.poke()
				}
				continue
			}
			agents, err := cs.Changed(ctx, town, last)
			if err != nil {
				if ctx.Err() == nil {
					s.Metrics.pollErrors.Inc()
					s.opts.Logger.Error("poll sweep", "town", town, "err", err)
				}
				continue
			}
			s.Metrics.polls.Inc()
			latest := last
			for _, id := range agents {
				latest = max(latest, id)
			}
			seen[town] = latest
			if len(agents) == 0 {
				continue
			}
			s.mu.RLock()
			s.pokeBehind(model.AgentKey{Town: town}, latest)
			for a, id := range agents {
				s.pokeBehind(model.AgentKey{Town: town, Agent: a}, id)
			}
			s.mu.RUnlock()
		}
	}
}

// feedKey is the identity of a stream: town and agent, any rig.
func feedKey(k model.AgentKey) model.AgentKey {
	return model.AgentKey{Town: k.Town, Agent: k.Agent}
}

// Notify tells the feeds of these events' agents, and of their towns, to
// read their Source now. It never blocks. It is for a Source that cannot
// say what a commit stored (a store can: see Committed).
func (s *Scheduler) Notify(events []model.Event) {
	var last model.AgentKey
	s.mu.RLock()
	defer s.mu.RUnlock()
	for i := range events {
		k := model.AgentKey{Town: events[i].TownID, Agent: events[i].AgentID}
		if i > 0 && k == last {
			continue
		}
		if i == 0 || k.Town != last.Town {
			s.pokeLocked(model.AgentKey{Town: k.Town})
		}
		last = k
		s.pokeLocked(k)
	}
}

// pokeLocked pokes k's feed if it runs. Called with s.mu held.
func (s *Scheduler) pokeLocked(k model.AgentKey) {
	if f := s.feeds[k]; f != nil {
		f.poke()
	}
}

// pokeBehind pokes k's feed if it runs and has not read its key's events
// through id. Called with s.mu held.
func (s *Scheduler) pokeBehind(k model.AgentKey, id int64) {
	if f := s.feeds[k]; f != nil && f.synced.Load() < id {
		f.poke()
	}
}

// Committed hands the feeds of a commit's agents, and of their towns, the
// events it stored, so that they fan them out without reading them back.
// It never blocks; call it, for every commit, in order, from the store's
// commit hook (model.Store.OnCommit).
//
// Per town the scheduler keeps a chain: commits pushed one after another,
// each starting where the one before ended (its Prev, the town's highest
// id before it, is the previous one's highest). Every event of the town
// in a chain was pushed, in order, to the feeds of its agent and its town.
// A feed that has every event of its key through the chain's start can
// therefore take the chain's commits as they come; one that cannot (a
// commit of another writer broke the chain, or the feed started before
// the chain did) reads its Source instead.
func (s *Scheduler) Committed(c model.Commit) {
	type town struct{ start, last int64 }
	towns := make(map[string]town, len(c.Prev))
	for i := range c.Events {
		t := towns[c.Events[i].TownID]
		t.last = max(t.last, c.Events[i].ID)
		towns[c.Events[i].TownID] = t
	}
	s.chainMu.Lock()
	for name, t := range towns {
		ch, ok := s.chains[name]
		if prev := c.Prev[name]; !ok || prev > ch.last {
			ch.start = prev // broken, or new: a chain starts here
		}
		ch.last = max(ch.last, t.last)
		s.chains[name] = ch
		t.start = ch.start
		towns[name] = t
	}
	s.chainMu.Unlock()
	// Each feed gets its key's events, split out here once.
	byFeed := make(map[*feed][]model.Event)
	s.mu.RLock()
	defer s.mu.RUnlock()
	for i := range c.Events {
		e := &c.Events[i]
		if f := s.feeds[model.AgentKey{Town: e.TownID}]; f != nil {
			byFeed[f] = append(byFeed[f], *e)
		}
		if f := s.feeds[model.AgentKey{Town: e.TownID, Agent: e.AgentID}]; f != nil {
			byFeed[f] = append(byFeed[f], *e)
		}
	}
	for f, evs := range byFeed {
		t := towns[f.key.Town]
		f.push(pushed{events: evs, start: t.start, last: t.last})
	}
}

// NotifyKeys tells the feeds of these agents, and of their towns, to poll
// now; nil means every feed. It is for commits made elsewhere (another instance on a shared
// database, heard through model.Store.Listen). It never blocks.
func (s *Scheduler) NotifyKeys(keys []model.AgentKey) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if keys == nil {
		for _, f := range s.feeds {
			f.poke()
		}
		return
	}
	for _, k := range keys {
		s.pokeLocked(feedKey(k))
		s.pokeLocked(model.AgentKey{Town: k.Town})
	}
}

// PullNow tells k's feed, if it runs, to pull its Upstream now rather than
// at its next interval: for an upstream that has said it holds new events.
// It never blocks.
func (s *Scheduler) PullNow(k model.AgentKey) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if f := s.feeds[feedKey(k)]; f != nil {
		f.pullNow()
	}
}

// Subscribe returns a subscription to every event of k with id > afterID:
// of one agent, or of a whole town when k has no agent (the Source must
// then be a TownSource, for gaps). It ends when ctx does or when Close is
// called. A town has one feed, shared by all its subscribers, as an agent
// has.
func (s *Scheduler) Subscribe(ctx context.Context, k model.AgentKey, afterID int64) (*Subscription, error) {
	kick := make(chan struct{}, 1)
	sub, err := s.SubscribeFunc(ctx, k, afterID, func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	})
	if sub != nil {
		sub.kick = kick
	}
	return sub, err
}

// SubscribeFunc is Subscribe for a reader that waits on no goroutine of its
// own: ready is called each time the subscription has something new for
// TryNext (see there). It is called from the feed, the context or Close, at
// any time and possibly under the feed's lock: it must return at once and
// must not call back into the subscription.
func (s *Scheduler) SubscribeFunc(ctx context.Context, k model.AgentKey, afterID int64, ready func()) (*Subscription, error) {
	f, err := s.acquire(k)
	if err != nil {
		return nil, err
	}
	s.Metrics.subscribers.Inc()

	sub := &Subscription{
		f:        f,
		cursor:   afterID,
		ready:    ready,
		catching: true,
	}
	sub.acked.Store(afterID)
	f.mu.Lock()
	f.subs[sub] = struct{}{}
	f.mu.Unlock()
	sub.stopCtx = context.AfterFunc(ctx, sub.close)
	return sub, nil
}

// Hold keeps k's feed running, with or without subscribers, until release
// is called (once; later calls do nothing). It is for agents an upstream
// reports running: their events are pulled and persisted whether or not
// anyone watches.
func (s *Scheduler) Hold(k model.AgentKey) (release func(), err error) {
	f, err := s.acquire(feedKey(k))
	if err != nil {
		return nil, err
	}
	var once sync.Once
	return func() { once.Do(func() { s.release(f) }) }, nil
}

// acquire returns k's feed, started if need be, with one more user.
func (s *Scheduler) acquire(k model.AgentKey) (*feed, error) {
	k = feedKey(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	f := s.feeds[k]
	if f == nil {
		f = newFeed(s, k)
		s.feeds[k] = f
		s.Metrics.feeds.Inc()
		go f.run()
	}
	f.nusers++
	return f, nil
}

// release drops one user of f and stops f when it was the last.
func (s *Scheduler) release(f *feed) {
	s.mu.Lock()
	f.nusers--
	last := f.nusers == 0 && s.feeds[f.key] == f
	if last {
		delete(s.feeds, f.key)
	}
	s.mu.Unlock()
	if last {
		s.Metrics.feeds.Dec()
		f.shutdown()
	}
}

// Close stops every feed; open subscriptions' Next returns ErrClosed.
func (s *Scheduler) Close() {
	s.stopSweep()
	<-s.swept
	s.mu.Lock()
	s.closed = true
	feeds := s.feeds
	s.feeds = map[model.AgentKey]*feed{}
	s.mu.Unlock()
	for _, f := range feeds {
		s.Metrics.feeds.Dec()
		f.shutdown()
	}
}

// ActiveFeeds reports how many feeds run now.
func (s *Scheduler) ActiveFeeds() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.feeds)
}

// Behind reports, for each count in over, how many open subscriptions have
// more than that many of their feed's events that their reader has not
// finished with: not yet taken, or taken in the batch it is still writing
// (the one before its latest TryNext call).
//
// It counts against the events a feed keeps in memory, its ring: a
// subscriber behind all of them is taken to be behind by the ring's length
// and one more, and a count above what the ring can tell is a lower bound.
// It costs a few comparisons per subscription, under each feed's lock, and
// nothing between calls, so it is for a scrape, not a hot path.
func (s *Scheduler) Behind(over ...int) []int {
	counts := make([]int, len(over))
	marks := make([]int64, len(over))
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, f := range s.feeds {
		f.mu.Lock()
		f.behindMarks(over, marks)
		for sub := range f.subs {
			acked := sub.acked.Load()
			for i, m := range marks {
				if acked < m {
					counts[i]++
				}
			}
		}
		f.mu.Unlock()
	}
	return counts
}
