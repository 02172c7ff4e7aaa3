package transport

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// LimitListener caps the connections open at once. A connection accepted
// past the cap is answered with Refusal (if any) and closed at once: it
// never waits in a queue, so a flood of connections costs the server a
// write and a close each, and the client learns to back off.
//
// A connection counts until it is closed, whoever closes it: net/http, or
// a stream that took it over (WebSocket, SSE on HTTP/1.1).
type LimitListener struct {
	net.Listener
	max     int64
	refusal []byte
	open    atomic.Int64
	// OnRefuse, if set, is called for each refused connection.
	OnRefuse func()
}

// NewLimitListener returns ln capped at max open connections. refusal is
// written to a connection refused past the cap: a plain HTTP/1.1 response
// on a cleartext port, nil where the port speaks TLS.
func NewLimitListener(ln net.Listener, max int, refusal []byte) *LimitListener {
	return &LimitListener{Listener: ln, max: int64(max), refusal: refusal}
}

// Open reports how many accepted connections are open now.
func (l *LimitListener) Open() int { return int(l.open.Load()) }

// Accept returns the next connection within the cap.
func (l *LimitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) <= l.max {
			return &limitedConn{Conn: c, l: l}, nil
		}
		l.open.Add(-1)
		if l.OnRefuse != nil {
			l.OnRefuse()
		}
		if l.refusal != nil {
			// Best effort, never blocking the accept loop for long.
			c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			c.Write(l.refusal)
		}
		c.Close()
	}
}

// limitedConn gives its slot back when closed, once.
type limitedConn struct {
	net.Conn
	l        *LimitListener
	once     sync.Once
	detached atomic.Bool
}

// Detach takes the connection from whoever holds c, as a hijack does: c's
// Close does nothing from now on, and the connection returned (holding the
// same slot) is the one to close. It is how H2 takes a cleartext HTTP/2
// connection from net/http, which closes what it was given when its
// handoff returns.
func (c *limitedConn) Detach() net.Conn {
	c.detached.Store(true)
	return &limitedConn{Conn: c.Conn, l: c.l}
}

func (c *limitedConn) Close() error {
	if c.detached.Load() {
		return nil
	}
	err := c.Conn.Close()
	c.once.Do(func() { c.l.open.Add(-1) })
	return err
}

// SyscallConn lets the Poller watch the socket under the wrapper, which
// buffers nothing.
func (c *limitedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.ErrUnsupported
	}
	return sc.SyscallConn()
}

// writerOf is what to write conn's bytes to: the connection under
// wrappers that only count or carry early bytes in. net.Buffers writes
// with one writev only to a *net.TCPConn; through a wrapper it would make a
// system call per frame.
func writerOf(conn net.Conn) net.Conn {
	switch c := conn.(type) {
	case *limitedConn:
		return writerOf(c.Conn)
	case *prefixConn:
		return writerOf(c.Conn)
	}
	return conn
}

// socket returns the plain TCP socket under conn, or nil when conn may
// hold bytes above the socket (TLS, a reader carrying early bytes).
func socket(conn net.Conn) *net.TCPConn {
	switch c := conn.(type) {
	case *net.TCPConn:
		return c
	case *limitedConn:
		return socket(c.Conn)
	}
	return nil
}
