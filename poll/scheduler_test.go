package poll

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/agentstream/agentstream/model"
)

// env is a real store on a temp SQLite file with a scheduler wired to its
// commit hook, as the server wires them.
type env struct {
	store *model.Store
	sched *Scheduler
	path  string
}

func newEnv(t testing.TB, sopts model.Options, popts Options) *env {
	t.Helper()
	path := current.DSN(t)
	t.Logf("backend %s", current.Name)
	store, err := model.Open(context.Background(), path, sopts)
	if err != nil {
		t.Fatal(err)
	}
	sched := New(store, popts)
	store.OnCommit(sched.Committed)
	t.Cleanup(func() {
		sched.Close()
		store.Close()
	})
	return &env{store: store, sched: sched, path: path}
}

func key(agent string) model.AgentKey { return model.AgentKey{Town: "t", Agent: agent} }

func (e *env) append(t testing.TB, agent, typ string, n int) []int64 {
	t.Helper()
	evs := make([]model.Event, n)
	for i := range evs {
		evs[i] = model.Event{TownID: "t", RigID: "r", AgentID: agent, Type: typ, Data: json.RawMessage(`{}`)}
	}
	if err := e.store.Append(context.Background(), evs); err != nil {
		t.Fatal(err)
	}
	ids := make([]int64, n)
	for i := range evs {
		ids[i] = evs[i].ID
	}
	return ids
}

// allIDs is every id the store holds for agent, in order.
func (e *env) allIDs(t testing.TB, agent string) []int64 {
	t.Helper()
	var ids []int64
	var after int64
	for {
		evs, err := e.store.After(context.Background(), key(agent), after, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) == 0 {
			return ids
		}
		for _, ev := range evs {
			ids = append(ids, ev.ID)
		}
		after = evs[len(evs)-1].ID
	}
}

// readUntil reads sub until an event of type "end", checking order on the
// way, and returns the ids. It fails the test after 60 s.
func readUntil(t testing.TB, sub *Subscription, onItem func(*Item)) ([]int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var ids []int64
	var buf []*Item
	for {
		var err error
		buf, err = sub.Next(ctx, buf, 256)
		if err != nil {
			return ids, err
		}
		for _, it := range buf {
			if len(ids) > 0 && it.ID <= ids[len(ids)-1] {
				return ids, fmt.Errorf("id %d after %d", it.ID, ids[len(ids)-1])
			}
			ids = append(ids, it.ID)
			if onItem != nil {
				onItem(it)
			}
			if it.Type == "end" {
				return ids, nil
			}
		}
	}
}

// waitFor polls cond until it holds, failing the test after 10 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func after(ids []int64, cursor int64) []int64 {
	i, _ := slices.BinarySearch(ids, cursor+1)
	return ids[i:]
}

// TestFanOutExactlyOnce: 1000 subscribers on one agent, a few on nine more,
// 8 concurrent writers over all ten: every subscriber receives exactly its
// agent's id sequence, and each event is encoded once per format in use.
func TestFanOutExactlyOnce(t *testing.T) {
	e := newEnv(t, model.Options{Retain: -1}, Options{})
	const agents, writers, perWriter = 10, 8, 100
	var encodes [2]atomic.Int64
	encoders := [2]func(*model.Event) []byte{}
	for f := range encoders {
		encoders[f] = func(ev *model.Event) []byte {
			encodes[f].Add(1)
			b, _ := json.Marshal(ev)
			return b
		}
	}
	type result struct {
		agent string
		ids   []int64
		err   error
	}
	results := make(chan result, 1100)
	var readers sync.WaitGroup
	subscribe := func(agent string, n int, encode bool) {
		for i := range n {
			sub, err := e.sched.Subscribe(context.Background(), key(agent), 0)
			if err != nil {
				t.Fatal(err)
			}
			readers.Go(func() {
				defer sub.Close()
				ids, err := readUntil(t, sub, func(it *Item) {
					if encode {
						it.Encoded(0, encoders[0])
						if i%2 == 0 {
							it.Encoded(1, encoders[1])
						}
					}
				})
				results <- result{agent, ids, err}
			})
		}
	}
	subscribe("a0", 1000, true)
	for a := 1; a < agents; a++ {
		subscribe(fmt.Sprintf("a%d", a), 5, false)
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range perWriter {
				e.append(t, fmt.Sprintf("a%d", (w+i)%agents), "step", 1+i%3)
			}
		})
	}
	wg.Wait()
	for a := range agents {
		e.append(t, fmt.Sprintf("a%d", a), "end", 1)
	}
	readers.Wait()
	close(results)
	want := map[string][]int64{}
	for a := range agents {
		name := fmt.Sprintf("a%d", a)
		want[name] = e.allIDs(t, name)
	}
	n := 0
	for r := range results {
		n++
		if r.err != nil {
			t.Fatalf("%s: %v", r.agent, r.err)
		}
		if !slices.Equal(r.ids, want[r.agent]) {
			t.Fatalf("%s: got %d ids, want %d (first diff somewhere in %v)", r.agent, len(r.ids), len(want[r.agent]), r.ids[:min(10, len(r.ids))])
		}
	}
	if n != 1045 {
		t.Fatalf("%d subscribers finished, want 1045", n)
	}
	if got, want := encodes[0].Load(), int64(len(want["a0"])); got != want {
		t.Errorf("format 0 encoded %d times for %d events and 1000 subscribers", got, want)
	}
	if got, want := encodes[1].Load(), int64(len(want["a0"])); got != want {
		t.Errorf("format 1 encoded %d times for %d events and 500 subscribers", got, want)
	}
}

// TestJoinAtRandomCursors: subscribers join at random cursors and times while
// a writer appends; with a tiny queue and ring they are demoted and catch up
// from the ring and from the store. Each gets exactly the ids after its
// cursor. Many seeds.
func TestJoinAtRandomCursors(t *testing.T) {
	for seed := range uint64(6) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, seed))
			e := newEnv(t, model.Options{Retain: -1}, Options{QueueLen: 4, RingLen: 16, PageSize: 25, Interval: 20 * time.Millisecond})
			var mu sync.Mutex
			var acked []int64
			e.append(t, "a", "before", 1+rng.IntN(30))
			acked = append(acked, e.allIDs(t, "a")...)

			type result struct {
				cursor int64
				ids    []int64
				err    error
			}
			results := make(chan result, 400)
			var readers sync.WaitGroup
			join := func() {
				mu.Lock()
				cursor := int64(0)
				if len(acked) > 0 && rng.IntN(4) > 0 {
					cursor = acked[rng.IntN(len(acked))]
				}
				mu.Unlock()
				sub, err := e.sched.Subscribe(context.Background(), key("a"), cursor)
				if err != nil {
					t.Fatal(err)
				}
				slow := rng.IntN(3) == 0
				readers.Go(func() {
					defer sub.Close()
					ids, err := readUntil(t, sub, func(*Item) {
						if slow {
							time.Sleep(50 * time.Microsecond) // a slow reader, to be demoted
						}
					})
					results <- result{cursor, ids, err}
				})
			}
			for range 300 {
				switch rng.IntN(5) {
				case 0:
					join()
				default:
					ids := e.append(t, "a", "step", 1+rng.IntN(4))
					mu.Lock()
					acked = append(acked, ids...)
					mu.Unlock()
				}
			}
			join()
			e.append(t, "a", "end", 1)
			readers.Wait()
			close(results)
			all := e.allIDs(t, "a")
			for r := range results {
				if r.err != nil {
					t.Fatalf("cursor %d: %v", r.cursor, r.err)
				}
				if want := after(all, r.cursor); !slices.Equal(r.ids, want) {
					t.Fatalf("cursor %d: got %v\nwant %v", r.cursor, r.ids, want)
				}
			}
		})
	}
}

// TestStalledSubscriberIsBounded: one subscriber never reads while 100,000
// events flow. The other receives them all; the stalled one holds no more
// than its queue, and later receives everything in order.
func TestStalledSubscriberIsBounded(t *testing.T) {
	const total, queue, ringLen = 100_000, 64, 4096
	e := newEnv(t, model.Options{Retain: -1}, Options{QueueLen: queue, RingLen: ringLen})
	stalled, err := e.sched.Subscribe(context.Background(), key("a"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	reader, err := e.sched.Subscribe(context.Background(), key("a"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	// The stalled one waits on the live path for the first event, then
	// never reads again.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	firstc := make(chan []*Item, 1)
	go func() {
		first, err := stalled.Next(ctx, nil, 10)
		if err != nil {
			t.Error(err)
		}
		firstc <- first
	}()
	waitFor(t, "the subscriber to join the live path", func() bool {
		stalled.f.mu.Lock()
		defer stalled.f.mu.Unlock()
		return len(stalled.f.live) == 1
	})
	e.append(t, "a", "first", 1)
	first := <-firstc
	if len(first) != 1 {
		t.Fatalf("first read: %d items", len(first))
	}
	got := make(chan []int64, 1)
	go func() {
		ids, err := readUntil(t, reader, nil)
		if err != nil {
			t.Error(err)
		}
		got <- ids
	}()
	all := []int64{first[0].ID}
	for i := 0; i < total; i += 1000 {
		typ := "step"
		if i+1000 >= total {
			typ = "end"
		}
		all = append(all, e.append(t, "a", "step", 999)...)
		all = append(all, e.append(t, "a", typ, 1)...)
	}
	if ids := <-got; !slices.Equal(ids, all) {
		t.Fatalf("the reading subscriber got %d events, want %d", len(ids), len(all))
	}
	if n := len(stalled.q); n > queue {
		t.Fatalf("stalled subscriber holds %d queued items, bound is %d", n, queue)
	}
	if !stalled.lagging.Load() {
		t.Fatal("stalled subscriber is still on the live path")
	}
	f := stalled.f
	f.mu.Lock()
	ringN, live := f.ring.n, len(f.live)
	f.mu.Unlock()
	if ringN > ringLen || live != 1 {
		t.Fatalf("feed holds %d ring items (bound %d) and %d live subscribers (want 1)", ringN, ringLen, live)
	}
	ids, err := readUntil(t, stalled, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ids = append([]int64{first[0].ID}, ids...); !slices.Equal(ids, all) {
		t.Fatalf("stalled subscriber later got %d events, want %d", len(ids), len(all))
	}
}

// TestLastSubscriberStopsFeed: when the last subscriber leaves, the feed and
// its goroutine stop, and nothing polls any more.
func TestLastSubscriberStopsFeed(t *testing.T) {
	e := newEnv(t, model.Options{}, Options{Interval: 10 * time.Millisecond})
	ignore := goleak.IgnoreCurrent()
	var subs []*Subscription
	for range 3 {
		sub, err := e.sched.Subscribe(context.Background(), key("a"), 0)
		if err != nil {
			t.Fatal(err)
		}
		subs = append(subs, sub)
	}
	e.append(t, "a", "step", 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := subs[0].Next(ctx, nil, 10); err != nil {
		t.Fatal(err)
	}
	if e.sched.ActiveFeeds() != 1 {
		t.Fatalf("%d feeds for one agent with 3 subscribers", e.sched.ActiveFeeds())
	}
	subs[0].Close()
	subs[1].Close()
	if e.sched.ActiveFeeds() != 1 {
		t.Fatal("feed stopped while a subscriber remains")
	}
	subs[2].Close()
	if e.sched.ActiveFeeds() != 0 {
		t.Fatal("feed still active after its last subscriber left")
	}
	goleak.VerifyNone(t, ignore)
	polls := e.sched.Metrics.Polls()
	e.append(t, "a", "step", 1) // a commit notifies; no feed may answer
	if got := e.sched.Metrics.Polls(); got != polls {
		t.Fatalf("polls went from %v to %v with no feed", polls, got)
	}
	if _, err := subs[2].Next(ctx, nil, 10); err != ErrClosed {
		t.Fatalf("Next after Close: %v, want ErrClosed", err)
	}
}

// TestContextEndsSubscription: a subscription ends with its context, and so
// does its feed.
func TestContextEndsSubscription(t *testing.T) {
	e := newEnv(t, model.Options{}, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	sub, err := e.sched.Subscribe(ctx, key("a"), 0)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := sub.Next(context.Background(), nil, 1); err != ErrClosed {
		t.Fatalf("Next after the subscription's context ended: %v", err)
	}
	if e.sched.ActiveFeeds() != 0 {
		t.Fatal("feed outlived its only subscription's context")
	}
}

// TestOtherWriterSeenAfterPoll: a second Store on the same SQLite file (a
// stand-in for another instance) appends; the first one's subscribers see
// the events at the next poll.
func TestOtherWriterSeenAfterPoll(t *testing.T) {
	e := newEnv(t, model.Options{}, Options{Interval: 50 * time.Millisecond})
	sub, err := e.sched.Subscribe(context.Background(), key("a"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	other, err := model.Open(context.Background(), e.path, model.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	evs := []model.Event{
		{TownID: "t", RigID: "r", AgentID: "a", Type: "remote", Data: json.RawMessage(`{}`)},
		{TownID: "t", RigID: "r", AgentID: "a", Type: "end", Data: json.RawMessage(`{}`)},
	}
	if err := other.Append(context.Background(), evs); err != nil {
		t.Fatal(err)
	}
	ids, err := readUntil(t, sub, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ids, []int64{evs[0].ID, evs[1].ID}) {
		t.Fatalf("got %v, want the other writer's %d and %d", ids, evs[0].ID, evs[1].ID)
	}
}

// TestGapWhenPrunedBeforeRead: a subscriber that stalls while retention
// prunes what it has not read is told of the gap, then gets the rest.
func TestGapWhenPrunedBeforeRead(t *testing.T) {
	e := newEnv(t, model.Options{Retain: 10}, Options{QueueLen: 4, RingLen: 8})
	sub, err := e.sched.Subscribe(context.Background(), key("a"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for range 50 {
		e.append(t, "a", "step", 1)
	}
	e.append(t, "a", "end", 1)
	if err := e.store.Prune(context.Background()); err != nil {
		t.Fatal(err)
	}
	kept := e.allIDs(t, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got []int64
	var gap *GapError
	var buf []*Item
	for len(got) == 0 || got[len(got)-1] != kept[len(kept)-1] {
		buf, err = sub.Next(ctx, buf, 100)
		if g, ok := err.(*GapError); ok {
			gap = g
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, it := range buf {
			got = append(got, it.ID)
		}
	}
	if gap == nil {
		t.Fatal("no gap reported though events were pruned unread")
	}
	if gap.Through >= kept[0] {
		t.Fatalf("gap through %d, but %d is still held", gap.Through, kept[0])
	}
	// Before the gap: what was queued (the first events); after it: exactly
	// what the store still holds.
	i := slices.Index(got, kept[0])
	if i < 0 || !slices.Equal(got[i:], kept) {
		t.Fatalf("after the gap got %v, want %v", got, kept)
	}
	for j := 1; j < len(got); j++ {
		if got[j] <= got[j-1] {
			t.Fatalf("order: %v", got)
		}
	}
}

// readyReader reads a subscription only when its ready function fires, on a
// goroutine started for the occasion, as a stream server without a
// goroutine per idle client does. It hands what it reads to onItems until
// that reports done, or the subscription ends; then it calls onEnd once.
type readyReader struct {
	sub     *Subscription
	pending atomic.Int32
	buf     []*Item
	onItems func([]*Item) (done bool)
	onEnd   func(error)
}

func (r *readyReader) ready() {
	if r.pending.Add(1) == 1 {
		go r.drain()
	}
}

func (r *readyReader) drain() {
	for {
		n := r.pending.Load()
		for {
			var err error
			r.buf, err = r.sub.TryNext(context.Background(), r.buf, 256)
			if err != nil || (len(r.buf) > 0 && r.onItems(r.buf)) {
				r.onEnd(err)
				return // pending stays above zero: no drain starts again
			}
			if len(r.buf) == 0 {
				break
			}
		}
		if r.pending.CompareAndSwap(n, 0) {
			return
		}
	}
}

// orderedReader is a readyReader that collects ids, checking their order,
// until an event of type "end"; done closes when it stops.
type orderedReader struct {
	readyReader
	mu   sync.Mutex // guards ids and err
	ids  []int64
	err  error
	done chan struct{}
}

func newOrderedReader() *orderedReader {
	r := &orderedReader{done: make(chan struct{})}
	r.onItems = func(items []*Item) bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, it := range items {
			if len(r.ids) > 0 && it.ID <= r.ids[len(r.ids)-1] {
				r.err = fmt.Errorf("id %d after %d", it.ID, r.ids[len(r.ids)-1])
				return true
			}
			r.ids = append(r.ids, it.ID)
			if it.Type == "end" {
				return true
			}
		}
		return false
	}
	r.onEnd = func(err error) {
		r.mu.Lock()
		if err != nil {
			r.err = err
		}
		r.mu.Unlock()
		close(r.done)
	}
	return r
}

// TestReadyDrivenSubscribers: subscribers that hold no goroutine between
// wake-ups — reading with TryNext only when ready fires — still receive
// every event exactly once and in order, through demotions (a queue of 4)
// and concurrent writers; and Close wakes one that waits.
func TestReadyDrivenSubscribers(t *testing.T) {
	e := newEnv(t, model.Options{Retain: -1}, Options{QueueLen: 4, RingLen: 64})
	const subs, writers, perWriter = 200, 4, 250
	readers := make([]*orderedReader, subs)
	for i := range readers {
		r := newOrderedReader()
		sub, err := e.sched.SubscribeFunc(context.Background(), key("a"), 0, r.ready)
		if err != nil {
			t.Fatal(err)
		}
		r.sub = sub
		readers[i] = r
		r.ready() // the first read: the subscription starts by catching up
	}
	var wg sync.WaitGroup
	for range writers {
		wg.Go(func() {
			for range perWriter / 10 {
				e.append(t, "a", "msg", 10)
			}
		})
	}
	wg.Wait()
	e.append(t, "a", "end", 1)
	want := e.allIDs(t, "a")
	for i, r := range readers {
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			t.Fatalf("reader %d stalled", i)
		}
		r.mu.Lock()
		if r.err != nil || !slices.Equal(r.ids, want) {
			t.Fatalf("reader %d: err %v, got %d ids, want %d", i, r.err, len(r.ids), len(want))
		}
		r.mu.Unlock()
		r.sub.Close()
	}

	// A reader waiting on an idle agent learns of Close through ready.
	r := newOrderedReader()
	sub, err := e.sched.SubscribeFunc(context.Background(), key("b"), 0, r.ready)
	if err != nil {
		t.Fatal(err)
	}
	r.sub = sub
	r.ready()
	sub.Close()
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not wake the reader")
	}
	if r.err != ErrClosed {
		t.Fatalf("after Close: %v, want ErrClosed", r.err)
	}
}

// queueUpstream is an Upstream whose pending events are appended to the
// store on Pull, as a relay from a container does.
type queueUpstream struct {
	store *model.Store
	mu    sync.Mutex
	queue map[string][]model.Event
	pulls map[string]int
}

func (u *queueUpstream) push(agent string, n int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for range n {
		u.queue[agent] = append(u.queue[agent], model.Event{TownID: "t", RigID: "r", AgentID: agent, Type: "up", Data: json.RawMessage(`{}`)})
	}
}

func (u *queueUpstream) Pull(ctx context.Context, k model.AgentKey) (int, error) {
	u.mu.Lock()
	evs := u.queue[k.Agent]
	delete(u.queue, k.Agent)
	u.pulls[k.Agent]++
	u.mu.Unlock()
	return len(evs), u.store.Append(ctx, evs)
}

func (u *queueUpstream) pullCount(agent string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.pulls[agent]
}

// TestHoldPullsUpstream: a held agent's upstream events are persisted with
// nobody watching; subscribers get them in order from one feed; the feed
// stops only when the hold and every subscriber are gone.
func TestHoldPullsUpstream(t *testing.T) {
	u := &queueUpstream{queue: map[string][]model.Event{}, pulls: map[string]int{}}
	e := newEnv(t, model.Options{}, Options{Interval: 5 * time.Millisecond, Upstream: u})
	u.store = e.store
	ignore := goleak.IgnoreCurrent()

	release, err := e.sched.Hold(key("a"))
	if err != nil {
		t.Fatal(err)
	}
	u.push("a", 3)
	waitFor(t, "held agent's events in the store", func() bool { return len(e.allIDs(t, "a")) == 3 })

	var subs []*Subscription
	for range 3 {
		sub, err := e.sched.Subscribe(context.Background(), key("a"), 0)
		if err != nil {
			t.Fatal(err)
		}
		subs = append(subs, sub)
	}
	if n := e.sched.ActiveFeeds(); n != 1 {
		t.Fatalf("%d feeds for one held and watched agent", n)
	}
	u.push("a", 5)
	waitFor(t, "the next pull", func() bool { return len(e.allIDs(t, "a")) == 8 })
	e.append(t, "a", "end", 1)
	want := e.allIDs(t, "a")
	for i, sub := range subs {
		got, err := readUntil(t, sub, nil)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("subscriber %d got %v, %v; want %v", i, got, err, want)
		}
	}
	// An agent nobody holds is never pulled.
	if n := u.pullCount("b"); n != 0 {
		t.Fatalf("agent b pulled %d times", n)
	}

	release()
	release() // a second call does nothing
	if n := e.sched.ActiveFeeds(); n != 1 {
		t.Fatal("feed stopped while watched")
	}
	for _, sub := range subs {
		sub.Close()
	}
	if n := e.sched.ActiveFeeds(); n != 0 {
		t.Fatalf("%d feeds after the hold and every subscriber left", n)
	}
	goleak.VerifyNone(t, ignore)
	pulls := u.pullCount("a")
	u.push("a", 1)
	if got := u.pullCount("a"); got != pulls {
		t.Fatalf("pulled with no feed: %d -> %d", pulls, got)
	}
}

// trickleUpstream has one new event on each of its first left pulls, as an
// agent writing steadily does.
type trickleUpstream struct {
	store *model.Store
	left  atomic.Int64
}

func (u *trickleUpstream) Pull(ctx context.Context, k model.AgentKey) (int, error) {
	if u.left.Add(-1) < 0 {
		return 0, nil
	}
	ev := model.Event{TownID: "t", RigID: "r", AgentID: k.Agent, Type: "up", Data: json.RawMessage(`{}`)}
	return 1, u.store.Append(ctx, []model.Event{ev})
}

// TestBusyAgentPulledSooner: after a pull that brought events the next one
// comes after BusyInterval, not Interval, so an agent that keeps writing is
// read before a bounded upstream buffer wraps.
func TestBusyAgentPulledSooner(t *testing.T) {
	u := &trickleUpstream{}
	u.left.Store(5)
	e := newEnv(t, model.Options{}, Options{Interval: time.Hour, BusyInterval: 5 * time.Millisecond, Upstream: u})
	u.store = e.store
	release, err := e.sched.Hold(key("a"))
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	// At Interval alone these five would take four hours.
	waitFor(t, "five pulls in a row", func() bool { return len(e.allIDs(t, "a")) == 5 })
}
