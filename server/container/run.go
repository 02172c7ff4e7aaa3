package container

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
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
}

// Run runs a command as an agent — the container's line rules, and
// agent.exited when it ends — and hands its events to the Sink as they
// come. Events are batched only by what piles up while a Send is under way,
// so a quiet agent's events go one by one at once and a fast one's go in
// large batches. The queue between them is bounded: a Sink that cannot keep
// up slows the command's writes rather than growing memory.
//
// When ctx ends the command's process group gets SIGTERM, and SIGKILL after
// the grace period; its agent.exited then says "stopped". If the Sink fails,
// the command is stopped the same way and Run returns the Sink's error.
// Otherwise it returns how the command ended.
func Run(ctx context.Context, o RunOptions) (ExitData, error) {
	if len(o.Command) == 0 || o.Command[0] == "" {
		return ExitData{}, fmt.Errorf("%w: no command to run", ErrBadRequest)
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 1000
	}
	if o.MaxBatchBytes <= 0 {
		o.MaxBatchBytes = 512 << 10
	}
	if o.Grace <= 0 {
		o.Grace = 10 * time.Second
	}
	p, err := startProc(o.Command, "", os.Environ(), o.Stdin, o.Stdout, o.Stderr)
	if err != nil {
		return ExitData{}, err
	}
	// The events still queued when ctx ends, agent.exited among them, are
	// delivered all the same; the sink's own retries bound how long.
	sendCtx, cancelSend := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelSend()
	queue := make(chan Line, 4*o.MaxBatch)
	var sendErr error
	sendDone := make(chan struct{}) // closed when send returns: early only if the sink failed
	go func() {
		defer close(sendDone)
		sendErr = send(sendCtx, o, queue)
	}()

	exited := make(chan struct{})
	stopperDone := make(chan struct{})
	go func() {
		defer close(stopperDone)
		select {
		case <-ctx.Done():
		case <-sendDone:
		case <-exited:
			return
		}
		signalGroup(p.pid(), syscall.SIGTERM)
		t := time.NewTimer(o.Grace)
		defer t.Stop()
		select {
		case <-t.C:
			signalGroup(p.pid(), syscall.SIGKILL)
		case <-exited:
		}
	}()

	var mu sync.Mutex // the two output streams take turns in the queue
	emit := func(l Line) {
		if o.MaxData > 0 {
			l = Fit(l, o.MaxData)
		}
		mu.Lock()
		defer mu.Unlock()
		select {
		case queue <- l:
		case <-sendDone: // the sink gave up: the rest is dropped
		}
	}
	wasStopped := func() bool {
		select {
		case <-sendDone:
			return true
		default:
			return ctx.Err() != nil
		}
	}
	exit, readErr := p.wait(2*time.Second, wasStopped, emit)
	close(exited)
	data, _ := json.Marshal(exit)
	emit(Line{Type: model.TypeExited, Data: data})
	close(queue)
	<-sendDone
	<-stopperDone
	if sendErr != nil {
		return exit, sendErr
	}
	return exit, readErr
}

// send hands queued lines to the sink until the queue is closed and empty.
func send(ctx context.Context, o RunOptions, queue <-chan Line) error {
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
			return err
		}
	}
	return nil
}
