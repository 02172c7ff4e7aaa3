package transport

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
)

// Poller tells when stream connections have something to read, for all of
// them with one epoll instance and one goroutine, so that an idle stream
// needs no goroutine blocked in a read. A client of an event stream almost
// never sends anything — a pong every half minute, a close at the end — and
// a goroutine parked in Read for that costs a stack, several KiB, per
// connection for its whole life.
//
// Only plain TCP connections can be watched; a caller falls back to a
// reading goroutine of its own for others (TLS buffers what it reads, so
// the socket being quiet does not mean nothing is left to read).
type Poller struct {
	epfd int
	wake [2]int // a pipe whose read end is in the epoll set: Close writes to it
	done chan struct{}

	// mu guards the fields below; epoll_ctl calls hold it for reading, so
	// that Close cannot close epfd under them.
	mu      sync.RWMutex
	watches map[int32]*Watch // by the id carried in each epoll event
	nextID  int32
	closed  bool
}

// Watch is one connection watched by a Poller: Arm it, and its function is
// called once, on a goroutine of its own, when the connection has bytes to
// read, or the peer closed or reset it. Arm again to hear of the next time.
type Watch struct {
	p  *Poller
	id int32
	rc syscall.RawConn
	fn func()

	mu      sync.Mutex
	added   bool // in the epoll set (ADD done; later arms MOD)
	stopped bool
}

// NewPoller starts a poller; Close stops it.
func NewPoller() (*Poller, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	p := &Poller{epfd: epfd, done: make(chan struct{}), watches: map[int32]*Watch{}}
	if err := syscall.Pipe2(p.wake[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		syscall.Close(epfd)
		return nil, fmt.Errorf("pipe2: %w", err)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: -1}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, p.wake[0], &ev); err != nil {
		p.closeFDs()
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	go p.loop()
	return p, nil
}

func (p *Poller) closeFDs() {
	syscall.Close(p.epfd)
	syscall.Close(p.wake[0])
	syscall.Close(p.wake[1])
}

// Close stops the poller and waits for its goroutine. Watches still armed
// are never called; their connections are the callers' to close.
func (p *Poller) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.watches = nil
	p.mu.Unlock()
	syscall.Write(p.wake[1], []byte{0})
	<-p.done
	p.closeFDs()
	return nil
}

func (p *Poller) loop() {
	defer close(p.done)
	var events [128]syscall.EpollEvent
	for {
		n, err := syscall.EpollWait(p.epfd, events[:], -1)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		p.mu.RLock()
		if p.closed {
			p.mu.RUnlock()
			return
		}
		for _, ev := range events[:n] {
			// An id no longer present is a watch stopped after the kernel
			// queued its event: ignore it. (Ids, not fds: a closed
			// connection's fd number is soon another connection's.)
			if w := p.watches[ev.Fd]; w != nil {
				go w.fire()
			}
		}
		p.mu.RUnlock()
	}
}

// Watch registers conn, unarmed, to call fn when armed and readable. It
// fails with errors.ErrUnsupported when conn is not a plain socket.
func (p *Poller) Watch(conn net.Conn, fn func()) (*Watch, error) {
	tcp := socket(conn)
	if tcp == nil {
		return nil, errors.ErrUnsupported
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, net.ErrClosed
	}
	for {
		p.nextID++
		if p.nextID < 0 {
			p.nextID = 0
		}
		if p.watches[p.nextID] == nil {
			break
		}
	}
	w := &Watch{p: p, id: p.nextID, rc: rc, fn: fn}
	p.watches[w.id] = w
	return w, nil
}

// fire calls the watch's function. Taking mu first orders the call after
// the Arm that asked for it, and so after whatever the caller did before
// arming: the kernel's word that the event came is not a Go memory barrier.
func (w *Watch) fire() {
	w.mu.Lock()
	w.mu.Unlock()
	w.fn()
}

// Arm asks for one call of the watch's function when the connection is
// readable; if it already is, the call comes at once. Level-triggered and
// one-shot: bytes left unread after the call are reported again on the next
// Arm, never lost, and never reported twice without an Arm between.
func (w *Watch) Arm() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.p.mu.RLock()
	defer w.p.mu.RUnlock()
	if w.stopped {
		return errStopped
	}
	if w.p.closed {
		return fmt.Errorf("arm read watch: %w", net.ErrClosed)
	}
	op := syscall.EPOLL_CTL_MOD
	if !w.added {
		op = syscall.EPOLL_CTL_ADD
	}
	ev := syscall.EpollEvent{
		Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT,
		Fd:     w.id,
	}
	var cerr error
	// Inside Control the fd cannot be closed and reused under us.
	err := w.rc.Control(func(fd uintptr) {
		cerr = syscall.EpollCtl(w.p.epfd, op, int(fd), &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("arm read watch: %w", err)
	}
	w.added = true
	return nil
}

// Stop ends the watch: its function is not called again. Call it before
// closing the connection.
func (w *Watch) Stop() {
	w.p.mu.Lock()
	if w.p.watches[w.id] == w {
		delete(w.p.watches, w.id)
	}
	w.p.mu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
	w.p.mu.RLock()
	defer w.p.mu.RUnlock()
	if w.added && !w.p.closed {
		w.rc.Control(func(fd uintptr) {
			syscall.EpollCtl(w.p.epfd, syscall.EPOLL_CTL_DEL, int(fd), nil)
		})
	}
}
