package container

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/agentstream/agentstream/model"
)

// A Sink takes an agent's events, in order, a batch at a time. Run calls it
// from one goroutine; an error ends the run.
type Sink interface {
	Send(ctx context.Context, batch []Line) error
}

// RunOptions are what Run wraps a command with.
type RunOptions struct {
	Command []string
	Sink    Sink
	// MaxData bounds an event's data (Fit); MaxBatch and MaxBatchBytes
	// bound one Send. Zero: no bound beyond MaxLine, 1000 events, 512 KiB.
	MaxData       int
	MaxBatch      int
	MaxBatchBytes int
	Stdin         io.Reader // default: none
	Stdout        io.Writer // where output is copied as well; nil: nowhere
	Stderr        io.Writer
	Grace         time.Duration // from SIGTERM to SIGKILL when ctx ends; default 10 s
	// Signals, if set, are signals the wrapper received (Ctrl-C): the
	// first is forwarded to the command's process group, which gets Grace
	// to exit before SIGKILL, as when ctx ends (which sends SIGTERM).
	Signals <-chan os.Signal
}

// UndeliveredError is Run's and Emit's error when the Sink gave up: N
// events, the batch it failed on and every one after it, were not
// delivered.
type UndeliveredError struct {
	N   int
	Err error
}

func (e *UndeliveredError) Error() string {
	if e.N == 1 {
		return fmt.Sprintf("1 event not delivered: %v", e.Err)
	}
	return fmt.Sprintf("%d events not delivered: %v", e.N, e.Err)
}

func (e *UndeliveredError) Unwrap() error { return e.Err }

func (o *RunOptions) fill() {
	if o.MaxBatch <= 0 {
		o.MaxBatch = 1000
	}
	if o.MaxBatchBytes <= 0 {
		o.MaxBatchBytes = 512 << 10
	}
	if o.Grace <= 0 {
		o.Grace = 10 * time.Second
	}
}

// Run runs a command as an agent — the container's line rules, and
// agent.exited when it ends — and hands its events to the Sink as they
// come (see outbox for how they are batched). The queue between them is
// bounded: a Sink that cannot keep up slows the command's writes rather
// than growing memory.
//
// When ctx ends the command's process group gets SIGTERM, and SIGKILL after
// the grace period; its agent.exited then says "stopped". If the Sink fails,
// the command is stopped the same way and Run returns the Sink's error.
// Otherwise it returns how the command ended.
func Run(ctx context.Context, o RunOptions) (ExitData, error) {
	if len(o.Command) == 0 || o.Command[0] == "" {
		return ExitData{}, fmt.Errorf("%w: no command to run", ErrBadRequest)
	}
	o.fill()
	p, err := startProc(o.Command, "", os.Environ(), o.Stdin, o.Stdout, o.Stderr)
	if err != nil {
		return ExitData{}, err
	}
	out := newOutbox(ctx, o)
	exited := make(chan struct{})
	stopperDone := make(chan struct{})
	go func() {
		defer close(stopperDone)
		sig := syscall.SIGTERM
		select {
		case <-ctx.Done():
		case <-out.failed:
		case s := <-o.Signals: // a nil channel: never
			if ss, ok := s.(syscall.Signal); ok {
				sig = ss
			}
		case <-exited:
			return
		}
		signalGroup(p.pid(), sig)
		t := time.NewTimer(o.Grace)
		defer t.Stop()
		select {
		case <-t.C:
			signalGroup(p.pid(), syscall.SIGKILL)
		case <-exited:
		}
	}()

	var mu sync.Mutex // the two output streams take turns in the queue
	put := func(l Line) {
		mu.Lock()
		defer mu.Unlock()
		out.put(l)
	}
	wasStopped := func() bool {
		select {
		case <-out.failed:
			return true
		default:
			return ctx.Err() != nil
		}
	}
	exit, readErr := p.wait(2*time.Second, wasStopped, put)
	close(exited)
	data, _ := json.Marshal(exit)
	out.put(Line{Type: model.TypeExited, Data: data})
	sendErr := out.close()
	<-stopperDone
	if sendErr != nil {
		return exit, sendErr
	}
	return exit, readErr
}

// Emit hands the lines of r, by the line rules (an event line as written,
// anything else as an output.line of stream "stdout"), to the Sink, batched
// as Run's are, and adds nothing of its own. It returns once r ends and
// everything is sent, or, if the Sink fails, with the Sink's error at the
// next line read. When ctx ends it stops reading, sends what it has read,
// and returns ctx's error; the read under way, if any, is left to end on
// its own goroutine.
func Emit(ctx context.Context, r io.Reader, o RunOptions) error {
	o.fill()
	out := newOutbox(ctx, o)
	var mu sync.Mutex // once stopped, the reader puts nothing more: close follows
	stopped := false
	put := func(l Line) bool {
		mu.Lock()
		defer mu.Unlock()
		return !stopped && out.put(l)
	}
	read := make(chan error, 1)
	go func() { read <- ScanLines(r, "stdout", MaxLine, put) }()
	var readErr error
	select {
	case readErr = <-read:
	case <-ctx.Done():
		mu.Lock()
		stopped = true
		mu.Unlock()
		readErr = ctx.Err()
	}
	if err := out.close(); err != nil {
		return err
	}
	return readErr
}

// outbox is the bounded queue between an agent's lines and a Sink, and the
// goroutine that empties it. Lines are batched only by what piles up while
// a Send is under way, so a quiet agent's events go one by one at once and
// a fast one's go in large batches.
type outbox struct {
	o      RunOptions
	queue  chan Line
	failed chan struct{} // closed when the sink has given up
	done   chan struct{} // closed when the sender has returned
	err    error         // the sink's error; read after done
	lost   atomic.Int64  // lines not delivered: the failed batch, what was queued, what came after
	cancel context.CancelFunc
}

func newOutbox(ctx context.Context, o RunOptions) *outbox {
	// What is queued when ctx ends, agent.exited among it, is delivered all
	// the same; the sink's own retries bound how long.
	sendCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	b := &outbox{o: o, queue: make(chan Line, 4*o.MaxBatch), failed: make(chan struct{}), done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(b.done)
		if b.err = b.send(sendCtx); b.err != nil {
			close(b.failed)
		}
	}()
	return b
}

// put queues l, fitted to MaxData, and reports whether the sink still takes
// lines: after it fails, lines are dropped (and counted as lost).
func (b *outbox) put(l Line) bool {
	if b.o.MaxData > 0 {
		l = Fit(l, b.o.MaxData)
	}
	select {
	case <-b.failed:
		b.lost.Add(1)
		return false
	default:
	}
	select {
	case b.queue <- l:
		return true
	case <-b.failed:
		b.lost.Add(1)
		return false
	}
}

// close waits until everything queued is sent and returns the sink's
// error, as an *UndeliveredError.
func (b *outbox) close() error {
	close(b.queue)
	<-b.done
	b.cancel()
	if b.err == nil {
		return nil
	}
	for range b.queue { // queued behind the batch that failed
		b.lost.Add(1)
	}
	return &UndeliveredError{N: int(b.lost.Load()), Err: b.err}
}

// send hands queued lines to the sink until the queue is closed and empty.
func (b *outbox) send(ctx context.Context) error {
	o := b.o
	queue := b.queue
	batch := make([]Line, 0, o.MaxBatch)
	for l := range queue {
		batch = append(batch[:0], l)
		size := len(l.Data)
	more:
		for len(batch) < o.MaxBatch && size < o.MaxBatchBytes {
			select {
			case l, ok := <-queue:
				if !ok {
					break more
				}
				batch = append(batch, l)
				size += len(l.Data)
			default:
				break more
			}
		}
		if err := o.Sink.Send(ctx, batch); err != nil {
			b.lost.Add(int64(len(batch)))
			return err
		}
	}
	return nil
}
