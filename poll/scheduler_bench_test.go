package poll

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
)

var emptyData = json.RawMessage(`{}`)

// memSource is an in-memory Source, so that the fan-out benchmark measures
// the scheduler and not SQLite.
type memSource struct {
	mu  sync.Mutex
	evs []model.Event
}

func (m *memSource) add(n int) []model.Event {
	m.mu.Lock()
	defer m.mu.Unlock()
	for range n {
		m.evs = append(m.evs, model.Event{ID: int64(len(m.evs) + 1), TownID: "t", AgentID: "a", Type: "x", Data: emptyData, CreatedAt: time.Now()})
	}
	return m.evs[len(m.evs)-n:]
}

func (m *memSource) After(_ context.Context, _ model.AgentKey, after int64, limit int) ([]model.Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	i := min(int(after), len(m.evs))
	return slices.Clone(m.evs[i:min(len(m.evs), i+limit)]), nil
}

func (m *memSource) Latest(context.Context, model.AgentKey) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.evs)), nil
}

func (m *memSource) PrunedThrough(context.Context, model.AgentKey) (int64, error) { return 0, nil }

// BenchmarkFanOut: one op is one event delivered to every subscriber.
// Reported per delivered event: ns and heap allocations, the event's own
// shared Item included. Subscribers read in one of two ways:
//   - next: a goroutine each, looping on Next (parked between events);
//   - ready: SubscribeFunc, a goroutine started per wake-up to drain
//     TryNext, none between events — how the server's streams read.
func BenchmarkFanOut(b *testing.B) {
	for _, mode := range []string{"next", "ready"} {
		for _, n := range []int{1, 100, 10_000} {
			b.Run(fmt.Sprintf("%s/subs=%d", mode, n), func(b *testing.B) { benchFanOut(b, mode, n) })
		}
	}
}

func benchFanOut(b *testing.B, mode string, n int) {
	src := &memSource{}
	s := New(src, Options{QueueLen: 1024, RingLen: 4096})
	defer s.Close()
	var delivered atomic.Int64
	var wg sync.WaitGroup
	// Each subscriber has a context of its own, as each stream's
	// request does; Close ends them.
	ctx := context.Background()
	subs := make([]*Subscription, n)
	for i := range subs {
		if mode == "ready" {
			r := &readyReader{
				onItems: func(items []*Item) bool { delivered.Add(int64(len(items))); return false },
				onEnd:   func(error) { wg.Done() },
			}
			sub, err := s.SubscribeFunc(ctx, model.AgentKey{Town: "t", Agent: "a"}, 0, r.ready)
			if err != nil {
				b.Fatal(err)
			}
			r.sub, subs[i] = sub, sub
			wg.Add(1) // done when the reader sees the end
			r.ready()
			continue
		}
		sub, err := s.Subscribe(ctx, model.AgentKey{Town: "t", Agent: "a"}, 0)
		if err != nil {
			b.Fatal(err)
		}
		subs[i] = sub
		wg.Go(func() {
			buf := make([]*Item, 0, 256)
			for {
				var err error
				if buf, err = sub.Next(ctx, buf, 256); err != nil {
					return
				}
				delivered.Add(int64(len(buf)))
			}
		})
	}
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	b.ResetTimer()
	const batch = 16
	for i := 0; i < b.N; i += batch {
		s.Notify(src.add(min(batch, b.N-i)))
		// Let the slowest subscriber stay within its queue.
		for delivered.Load() < int64(i)*int64(n)-int64(n*512) {
			runtime.Gosched()
		}
	}
	want := int64(b.N) * int64(n)
	for delivered.Load() < want {
		runtime.Gosched()
	}
	b.StopTimer()
	runtime.ReadMemStats(&ms1)
	for _, sub := range subs {
		sub.Close()
	}
	wg.Wait()
	d := float64(want)
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/d, "ns/delivery")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/d, "allocs/delivery")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/float64(b.N), "allocs/event")
}

// BenchmarkAppendToSubscriber: time from Store.Append returning to a
// subscriber holding the event, real SQLite store, one event per op.
// Negative would mean the subscriber had it first (the commit hook runs
// before Append returns).
func BenchmarkAppendToSubscriber(b *testing.B) {
	e := newEnv(b, model.Options{Retain: -1}, Options{})
	sub, err := e.sched.Subscribe(context.Background(), key("a"), 0)
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Close()
	got := make(chan time.Time, 1)
	go func() {
		var buf []*Item
		for {
			if buf, err = sub.Next(context.Background(), buf, 16); err != nil {
				return
			}
			for range buf {
				got <- time.Now()
			}
		}
	}()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for b.Loop() {
		e.append(b, "a", "x", 1)
		returned := time.Now()
		lat = append(lat, (<-got).Sub(returned))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkBehind: one op is one scrape of agentstream_streams_behind
// (Behind with its three thresholds) over 5000 subscriptions, on one feed
// or spread two to a feed. Reported per subscription as well.
func BenchmarkBehind(b *testing.B) {
	for _, perFeed := range []int{5000, 2} {
		b.Run(fmt.Sprintf("subs-per-feed=%d", perFeed), func(b *testing.B) {
			src := &memSource{}
			src.add(100)
			s := New(src, Options{Interval: time.Hour})
			defer s.Close()
			const total = 5000
			for i := range total {
				k := model.AgentKey{Town: "t", Agent: fmt.Sprint("a", i/perFeed)}
				if _, err := s.Subscribe(context.Background(), k, int64(i%100)); err != nil {
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			for b.Loop() {
				s.Behind(BehindThresholds()...)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/total, "ns/subscription")
		})
	}
}
