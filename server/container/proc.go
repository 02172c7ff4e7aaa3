package container

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// proc is an agent process and the read ends of its output pipes: what the
// container and `agentstream run` share, so that both turn output into
// events, and exits into agent.exited, the same way.
type proc struct {
	cmd        *exec.Cmd
	outR, errR *os.File
	echoOut    io.Writer // where raw output is copied as well, if anywhere
	echoErr    io.Writer
}

// startProc starts command in a process group of its own.
func startProc(command []string, dir string, env []string, stdin io.Reader, echoOut, echoErr io.Writer) (*proc, error) {
	cmd := exec.Command(command[0], command[1:]...)
	cmd.Dir, cmd.Env, cmd.Stdin = dir, env, stdin
	cmd.SysProcAttr = groupAttr()
	// Pipes of our own rather than cmd.StdoutPipe: Wait then returns when
	// the process exits, even if a child it left holds the pipes.
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("%w: cannot start %q: %v", ErrBadRequest, command[0], err)
	}
	return &proc{cmd: cmd, outR: outR, errR: errR, echoOut: echoOut, echoErr: echoErr}, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// wait reads the process's output by the line rules, calling fn with each
// line (from two goroutines, one per stream), until the process has exited
// and its output is drained — or, if children it left hold the pipes, for
// drain after the exit. It returns how the process ended; stopped says
// whether it was asked to stop, checked after the exit.
func (p *proc) wait(drain time.Duration, stopped func() bool, fn func(Line)) (ExitData, error) {
	var readers sync.WaitGroup
	var readErr error
	var mu sync.Mutex
	for _, s := range []struct {
		name string
		r    *os.File
		echo io.Writer
	}{{"stdout", p.outR, p.echoOut}, {"stderr", p.errR, p.echoErr}} {
		readers.Go(func() {
			var r io.Reader = s.r
			if s.echo != nil {
				r = io.TeeReader(r, s.echo)
			}
			if err := ScanLines(r, s.name, MaxLine, func(l Line) bool { fn(l); return true }); err != nil && !errors.Is(err, os.ErrClosed) {
				mu.Lock()
				readErr = fmt.Errorf("%s: %w", s.name, err)
				mu.Unlock()
			}
		})
	}
	waitErr := p.cmd.Wait()
	drained := make(chan struct{})
	go func() { readers.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drain):
		// What children still write from now on is not the agent's.
		p.outR.Close()
		p.errR.Close()
		<-drained
	}
	p.outR.Close()
	p.errR.Close()
	return exitData(waitErr, stopped()), readErr
}

// exitData is the agent.exited data for a process that ended with waitErr.
func exitData(waitErr error, stopped bool) ExitData {
	exit := ExitData{Reason: ReasonCompleted}
	var ee *exec.ExitError
	switch {
	case waitErr == nil:
	case errors.As(waitErr, &ee):
		exit.ExitCode = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			exit.ExitCode = 128 + int(ws.Signal())
			exit.Signal = ws.Signal().String()
		}
	default:
		exit.ExitCode = -1
	}
	if exit.ExitCode != 0 {
		exit.Reason = ReasonFailed
	}
	if stopped {
		exit.Reason = ReasonStopped
	}
	return exit
}
