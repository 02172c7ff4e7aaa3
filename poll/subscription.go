package poll

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/agentstream/agentstream/model"
)

// GapError is returned by Next when events after the subscriber's cursor
// were pruned from the Source before it could read them. The subscription
// goes on after Through; the caller tells its client, never loses silently.
//
// On a town subscription a gap is one agent's: Agent names it, and only
// that agent's events after After through Through are gone; the cursor
// does not move. A town gap with no Agent (events the feed fanned out, all
// gone from the Source before a catch-up read them) is the whole town's.
type GapError struct {
	Agent   string // on a town subscription: the agent whose events are gone
	After   int64  // the cursor the subscriber had
	Through int64  // events up to this id are gone
}

func (e *GapError) Error() string {
	if e.Agent != "" {
		return fmt.Sprintf("poll: events of %s after %d through %d were pruned before delivery", e.Agent, e.After, e.Through)
	}
	return fmt.Sprintf("poll: events after %d through %d were pruned before delivery", e.After, e.Through)
}

// Subscription delivers one agent's events after a cursor, in id order,
// exactly once. Next and TryNext are for one goroutine at a time; Close may
// be called from any.
type Subscription struct {
	f     *feed
	kick  chan struct{} // Subscribe's, for Next: capacity 1, sent on by ready
	ready func()        // called when TryNext has something new
	// qmu guards q, the live items queued by the feed (under f.mu as
	// well), oldest first from q[qhead]. A slice rather than a channel
	// of Options.QueueLen: it holds what waits, not room for the most
	// that may, which on an idle subscription was most of its memory.
	qmu     sync.Mutex
	q       []*Item
	qhead   int
	lagging atomic.Bool // set by the feed when it took us off the live path
	closed  atomic.Bool
	once    sync.Once
	stopCtx func() bool
	// held is what the subscriber holds, by Item.Cost: its queued live
	// items (the feed adds them, under f.mu) and the batch it was last
	// handed (until it asks for the next). The feed demotes a subscriber
	// that would hold more than Options.StreamBytes.
	held atomic.Int64
	// acked is the cursor as of the caller's last TryNext: everything
	// through it the caller has finished with (written, for a stream).
	// Read at scrape time, to count the streams that are behind.
	acked atomic.Int64

	// Owned by the goroutine calling Next.
	cursor   int64 // the last id returned
	catching bool  // not on the live path: reading ring or Source
	batch    int64 // the cost of the batch last returned
	// On a town subscription: the agents' gaps found and not yet returned,
	// and for each agent the id through which its loss has been told, so
	// that it is told once.
	gaps []*GapError
	told map[string]int64
}

func (s *Subscription) wakeUp() {
	if s.ready != nil {
		s.ready()
	}
}

// enqueue queues items for the subscriber, as many as its queue and the
// byte budget take, and reports whether all of them fitted. Called with
// f.mu held.
func (s *Subscription) enqueue(items []*Item, budget int64, limit int) bool {
	s.qmu.Lock()
	if s.qhead > 0 && len(s.q) == cap(s.q) {
		// Room at the front, from items read: use it before growing.
		n := copy(s.q, s.q[s.qhead:])
		clear(s.q[n:])
		s.q, s.qhead = s.q[:n], 0
	}
	for _, it := range items {
		cost := it.Cost()
		if h := s.held.Load(); h > 0 && h+cost > budget || len(s.q)-s.qhead >= limit {
			s.qmu.Unlock()
			return false
		}
		s.q = append(s.q, it)
		s.held.Add(cost)
	}
	s.qmu.Unlock()
	return true
}

// Cursor is the id of the last event Next returned (or the starting cursor).
func (s *Subscription) Cursor() int64 { return s.cursor }

// Next blocks until there are events after the cursor, then appends up to
// max of them to buf[:0] in id order and returns it. It returns ctx's error
// when ctx ends, ErrClosed after Close, a *GapError when events were pruned
// before they could be read (call Next again to go on), or a Source error.
// It is for subscriptions made with Subscribe; one made with SubscribeFunc
// is read with TryNext.
func (s *Subscription) Next(ctx context.Context, buf []*Item, max int) ([]*Item, error) {
	for {
		buf, err := s.TryNext(ctx, buf, max)
		if err != nil || len(buf) > 0 {
			return buf, err
		}
		select {
		case <-s.kick:
			// Events queued, demoted, closed, or the feed shut down (it
			// kicks every live subscriber): TryNext sees which. The feed's
			// own Done channel stays out of this select: thousands of
			// subscribers blocking on one shared channel contend on its
			// lock.
		case <-ctx.Done():
			return buf, ctx.Err()
		}
	}
}

// TryNext is Next without the wait: when nothing is ready on the live path
// it returns buf[:0] and no error. It still reads the feed's ring or the
// Source while the subscriber catches up, and may wait for that.
//
// A subscription made with SubscribeFunc calls its ready function whenever
// TryNext would have something new to say: events, a demotion, the end. A
// caller that drains TryNext until it returns nothing, and calls it again
// on every ready, needs no goroutine of its own while the agent is quiet.
//
// A batch holds at most Options.StreamBytes by Item.Cost, but always at
// least one item.
func (s *Subscription) TryNext(ctx context.Context, buf []*Item, max int) (_ []*Item, err error) {
	// The caller is done with the last batch.
	s.acked.Store(s.cursor)
	s.held.Add(-s.batch)
	s.batch = 0
	defer func() {
		for _, it := range buf {
			s.batch += it.Cost()
		}
		s.held.Add(s.batch)
	}()
	clear(buf) // the last batch's items must not outlive it here
	buf = buf[:0]
	for {
		if s.closed.Load() || s.f.stopped.Load() {
			return buf, ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return buf, err
		}
		if s.catching {
			var live bool
			var err error
			buf, live, err = s.catchUp(ctx, buf, max)
			if err != nil || len(buf) > 0 {
				return buf, err
			}
			if !live {
				continue
			}
			s.catching = false
		}
		// Read the flag before draining: once demoted, nothing more enters
		// the queue, so what the drain leaves behind is nothing.
		lagging := s.lagging.Load()
		if buf = s.drain(buf, max); len(buf) > 0 || !lagging {
			return buf, nil
		}
		s.catching = true
	}
}

// drain appends queued live items to buf, up to max of them and the
// byte budget (an item that does not fit stays queued). Items at or
// before the cursor are dropped: a subscriber that read ahead of the feed
// from the Source sees those events again live.
func (s *Subscription) drain(buf []*Item, max int) []*Item {
	budget := s.f.s.opts.StreamBytes
	var size int64
	for _, it := range buf {
		size += it.Cost()
	}
	s.qmu.Lock()
	for len(buf) < max && s.qhead < len(s.q) {
		it := s.q[s.qhead]
		cost := it.Cost()
		if len(buf) > 0 && size+cost > budget {
			break
		}
		s.q[s.qhead] = nil
		s.qhead++
		s.held.Add(-cost) // out of the queue; the batch is counted at return
		if it.ID <= s.cursor {
			continue
		}
		s.cursor = it.ID
		size += cost
		buf = append(buf, it)
	}
	if s.qhead == len(s.q) {
		s.q, s.qhead = s.q[:0], 0
	}
	s.qmu.Unlock()
	return buf
}

// Trim lets go of the room an empty queue keeps for the next events, which
// after a burst may be Options.QueueLen of them. It is for a reader going
// quiet; queueing again takes it back.
func (s *Subscription) Trim() {
	s.qmu.Lock()
	if s.qhead == len(s.q) {
		s.q, s.qhead = nil, 0
	}
	s.qmu.Unlock()
}

// catchUp brings the subscriber up to the feed: from the feed's ring when it
// reaches back far enough (shared items, no I/O), else from the Source. When
// the cursor has reached the feed it joins the live path and reports live.
func (s *Subscription) catchUp(ctx context.Context, buf []*Item, max int) (_ []*Item, live bool, _ error) {
	f := s.f
	select {
	case <-f.ready:
	case <-f.ctx.Done():
		return buf, false, ErrClosed
	case <-ctx.Done():
		return buf, false, ctx.Err()
	}
	f.mu.Lock()
	if f.stopped.Load() || s.closed.Load() {
		f.mu.Unlock()
		return buf, false, ErrClosed
	}
	if s.cursor >= f.cursor {
		// Under f.mu: no event can be fanned out between this check and
		// joining, so nothing falls between catch-up and live.
		s.lagging.Store(false)
		f.live = append(f.live, s)
		f.mu.Unlock()
		return buf, true, nil
	}
	n := len(buf)
	budget := f.s.opts.StreamBytes
	buf, ok := f.ring.after(buf, s.cursor, max, budget)
	target := f.cursor
	if ok && len(buf) > n {
		s.cursor = buf[len(buf)-1].ID
		if s.cursor == f.cursor {
			// Caught up to the feed from its ring: join now, in the same
			// critical section, rather than on the next call.
			s.lagging.Store(false)
			f.live = append(f.live, s)
			s.catching = false
		}
	}
	f.mu.Unlock()
	if ok {
		return buf, false, nil
	}

	f.s.Metrics.catchups.Inc()
	if f.key.IsTown() {
		if err := s.townGap(ctx); err != nil {
			return buf, false, err
		}
	} else {
		pruned, err := f.s.src.PrunedThrough(ctx, f.key)
		if err != nil {
			return buf, false, fmt.Errorf("catch up %s after %d: %w", f.key.Agent, s.cursor, err)
		}
		if s.cursor < pruned {
			gap := &GapError{After: s.cursor, Through: pruned}
			s.cursor = pruned
			return buf, false, gap
		}
	}
	var err error
	var evs []model.Event
	if bs, ok := f.s.src.(BoundedSource); ok {
		evs, err = bs.AfterBytes(ctx, f.key, s.cursor, min(max, f.s.opts.PageSize), budget/2)
	} else {
		evs, err = f.s.src.After(ctx, f.key, s.cursor, min(max, f.s.opts.PageSize))
	}
	if err != nil {
		return buf, false, fmt.Errorf("catch up %s after %d: %w", f.key.Agent, s.cursor, err)
	}
	if len(evs) == 0 {
		// The feed fanned out events up to target, so the Source held them;
		// none left after our cursor means they were pruned just now.
		gap := &GapError{After: s.cursor, Through: target}
		s.cursor = target
		return buf, false, gap
	}
	// Item.Cost counts more than the data AfterBytes sums: trim to it.
	var size int64
	for i := range evs {
		if size += eventCost(&evs[i]); size > budget && i > 0 {
			evs = evs[:i]
			break
		}
	}
	buf = itemsFor(buf, evs)
	s.cursor = evs[len(evs)-1].ID
	return buf, false, nil
}

// townGap finds, before a town subscriber reads the Source after its
// cursor, the agents whose events after it retention has deleted, and
// returns the first loss not told yet as a *GapError (the others wait in
// s.gaps for the next calls), or a Source error. Each agent's loss is told once, before any
// of its events that remain: the cursor stays, since the town's other
// agents have lost nothing.
func (s *Subscription) townGap(ctx context.Context) error {
	if len(s.gaps) == 0 {
		ts, ok := s.f.s.src.(TownSource)
		if !ok {
			return nil
		}
		marks, err := ts.PrunedAfter(ctx, s.f.key.Town, s.cursor)
		if err != nil {
			return fmt.Errorf("catch up town %s after %d: %w", s.f.key.Town, s.cursor, err)
		}
		for _, m := range marks {
			if m.PrunedThrough <= s.told[m.AgentID] {
				continue
			}
			if s.told == nil {
				s.told = make(map[string]int64)
			}
			s.told[m.AgentID] = m.PrunedThrough
			s.gaps = append(s.gaps, &GapError{Agent: m.AgentID, After: s.cursor, Through: m.PrunedThrough})
		}
	}
	if len(s.gaps) == 0 {
		return nil
	}
	gap := s.gaps[0]
	s.gaps = s.gaps[1:]
	return gap
}

// Close ends the subscription; the last one of an agent stops its feed.
func (s *Subscription) Close() {
	s.stopCtx()
	s.close()
}

// close is Close without unhooking the context; it is what the context's
// AfterFunc calls (possibly while Subscribe is still setting stopCtx).
func (s *Subscription) close() {
	s.once.Do(func() {
		f := s.f
		f.mu.Lock()
		s.closed.Store(true)
		f.removeLive(s)
		delete(f.subs, s)
		f.mu.Unlock()
		s.wakeUp()
		f.s.Metrics.subscribers.Dec()
		f.s.release(f)
	})
}
