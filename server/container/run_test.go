package container

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// recordSink keeps what Run sends, and can be made to fail or to take time.
type recordSink struct {
	mu      sync.Mutex
	batches [][]Line
	delay   time.Duration
	fail    error
}

func (s *recordSink) Send(ctx context.Context, batch []Line) error {
	time.Sleep(s.delay)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail != nil {
		return s.fail
	}
	s.batches = append(s.batches, append([]Line(nil), batch...))
	return nil
}

func (s *recordSink) lines() []Line {
	s.mu.Lock()
	defer s.mu.Unlock()
	var all []Line
	for _, b := range s.batches {
		all = append(all, b...)
	}
	return all
}

func TestRunBatchesInOrder(t *testing.T) {
	sink := &recordSink{delay: 20 * time.Millisecond}
	exit, err := Run(context.Background(), RunOptions{
		Command: []string{"sh", script(t, "count.sh"), "3000"}, Sink: sink, MaxBatch: 1000, MaxData: 64 << 10,
	})
	if err != nil || exit != (ExitData{Reason: ReasonCompleted}) {
		t.Fatalf("Run: %+v, %v", exit, err)
	}
	got := sink.lines()
	if len(got) != 3001 || got[3000].Type != "agent.exited" {
		t.Fatalf("%d events, last %s", len(got), got[len(got)-1].Type)
	}
	for i, l := range got[:3000] {
		var d struct{ N int }
		if json.Unmarshal(l.Data, &d); d.N != i+1 {
			t.Fatalf("event %d is step %d", i, d.N)
		}
	}
	// A slow sink sees few, large batches, none over the bound.
	for _, b := range sink.batches {
		if len(b) > 1000 {
			t.Fatalf("batch of %d", len(b))
		}
	}
	if len(sink.batches) > 100 {
		t.Fatalf("%d batches for 3001 events through a slow sink", len(sink.batches))
	}
}

func TestRunStoppedByContext(t *testing.T) {
	sink := &recordSink{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var exit ExitData
	var err error
	go func() {
		defer close(done)
		exit, err = Run(ctx, RunOptions{Command: []string{"sh", script(t, "ignore-term.sh")}, Sink: sink, Grace: 2 * time.Second})
	}()
	waitFor(t, "the command to be ready", func() bool { return len(sink.lines()) > 0 })
	cancel()
	<-done
	if err != nil || exit != (ExitData{Reason: ReasonStopped, ExitCode: 137, Signal: "killed"}) {
		t.Fatalf("Run: %+v, %v", exit, err)
	}
	got := sink.lines()
	var types []string
	for _, l := range got {
		if l.Type != TypeOutputLine { // the shell may say its sleep was terminated
			types = append(types, l.Type)
		}
	}
	// Heard SIGTERM, went on, was killed; agent.exited still delivered.
	if strings.Join(types, " ") != "ready term.ignored agent.exited" {
		t.Fatalf("events %v", types)
	}
}

func TestRunStopsWhenSinkFails(t *testing.T) {
	refused := errors.New("401 wrong token")
	sink := &recordSink{fail: refused}
	done := make(chan struct{})
	var exit ExitData
	var err error
	go func() {
		defer close(done)
		exit, err = Run(context.Background(), RunOptions{Command: []string{"sh", script(t, "sleeper.sh")}, Sink: sink, Grace: time.Second})
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Run went on after its sink failed")
	}
	if !errors.Is(err, refused) || exit.Reason != ReasonStopped {
		t.Fatalf("Run: %+v, %v; want the sink's error and a stopped command", exit, err)
	}
}

func TestRunBadCommand(t *testing.T) {
	for _, cmd := range [][]string{nil, {""}, {"/no/such/program"}} {
		if _, err := Run(context.Background(), RunOptions{Command: cmd, Sink: &recordSink{}}); !errors.Is(err, ErrBadRequest) {
			t.Errorf("Run(%q): %v", cmd, err)
		}
	}
}

func TestEmit(t *testing.T) {
	sink := &recordSink{}
	in := "{\"type\":\"step\",\"data\":{\"n\":1}}\nplain\n{\"type\":\"agent.exited\",\"data\":{\"reason\":\"completed\",\"exit_code\":0}}\n"
	if err := Emit(context.Background(), strings.NewReader(in), RunOptions{Sink: sink}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, l := range sink.lines() {
		got = append(got, l.Type+" "+string(l.Data))
	}
	want := `step {"n":1}|output.line {"stream":"stdout","line":"plain"}|agent.exited {"reason":"completed","exit_code":0}`
	if strings.Join(got, "|") != want {
		t.Fatalf("emitted %q", got)
	}
}

// endless is a producer that never stops writing lines.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	n := 0
	for n+5 <= len(p) {
		n += copy(p[n:], "tick\n")
	}
	return n, nil
}

// TestEmitStopsWhenSinkFails: a refused sink ends Emit even while its input
// goes on, so that `producer | agentstream emit` with a wrong token exits.
func TestEmitStopsWhenSinkFails(t *testing.T) {
	refused := errors.New("401 wrong token")
	done := make(chan error, 1)
	go func() { done <- Emit(context.Background(), endless{}, RunOptions{Sink: &recordSink{fail: refused}}) }()
	select {
	case err := <-done:
		if !errors.Is(err, refused) {
			t.Fatalf("Emit: %v, want the sink's error", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Emit went on reading after its sink failed")
	}
}
