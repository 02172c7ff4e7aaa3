package server

import (
	"sync"
	"sync/atomic"
	"time"
)

// lingerFor is how long a detached stream's goroutine waits for more
// after it has written everything, before it exits. A stream whose agent
// is busy keeps one goroutine, with the stack it grew writing, instead of
// starting a fresh one per event and growing its stack again (that copy
// was a fifth of the server's CPU at 10 events/s to 5000 clients); a quiet
// stream holds none.
const lingerFor = 500 * time.Millisecond

// lingerTick is how often the reaper looks: a goroutine lingers between
// lingerFor and lingerFor+lingerTick.
const lingerTick = lingerFor / 2

// reaper ends the lingering goroutines of detached streams: one ticker
// for them all. A timer per stream, reset after every write and waited on
// in a select beside the stream's kick, cost a timer update and a select
// per delivery; here a lingering goroutine waits on its kick alone, and
// marks when it began with the reaper's epoch, an atomic store.
//
// The ticker runs only while detached streams are open.
type reaper struct {
	epoch atomic.Int64 // counts ticks; starts at 1 (0 marks a pump not lingering)

	mu    sync.Mutex
	pumps map[*pump]struct{}
	stop  chan struct{} // closed when the last pump leaves; nil while not running
}

// add registers p, a detached stream's pump, until remove.
func (r *reaper) add(p *pump) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pumps == nil {
		r.pumps = map[*pump]struct{}{}
		r.epoch.CompareAndSwap(0, 1)
	}
	r.pumps[p] = struct{}{}
	if r.stop == nil {
		r.stop = make(chan struct{})
		go r.run(r.stop)
	}
}

func (r *reaper) remove(p *pump) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.pumps, p)
	if len(r.pumps) == 0 && r.stop != nil {
		close(r.stop)
		r.stop = nil
	}
}

func (r *reaper) run(stop chan struct{}) {
	t := time.NewTicker(lingerTick)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		// A pump that began lingering in epoch e has waited at least
		// lingerFor (two whole ticks) once the epoch is e+3.
		due := r.epoch.Add(1) - 3
		r.mu.Lock()
		for p := range r.pumps {
			if since := p.lingerSince.Load(); since != 0 && since <= due && p.lingerSince.CompareAndSwap(since, 0) {
				p.reaped.Store(true)
				select {
				case p.kick <- struct{}{}:
				default:
				}
			}
		}
		r.mu.Unlock()
	}
}
