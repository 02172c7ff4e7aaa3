package transport

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// TLSListener terminates TLS for an http.Server and s: it does the
// handshakes of the connections ln accepts, gives those that chose h2 by
// ALPN to s, and returns the rest (HTTP/1.1) from Accept as *tls.Conn, for
// the http.Server to Serve. cfg's NextProtos should offer h2 and
// http/1.1.
//
// Why not net/http's ServeTLS with s installed: net/http hands an h2
// connection over on the goroutine that did its handshake, and closes the
// connection when the handoff returns. That goroutine, with the stack the
// handshake grew, would then have to stay for the connection's whole life.
// Here the handshake's goroutine ends once the connection is set up, and
// an idle HTTP/2 connection over TLS is read through the Poller, as a
// cleartext one is: no goroutine and no read buffer while it is quiet.
//
// A handshake gets handshakeTimeout (10 s if zero) and runs on a goroutine
// of its own, so that a slow client holds up no one else.
func (s *H2) TLSListener(ln net.Listener, cfg *tls.Config, handshakeTimeout time.Duration) net.Listener {
	if handshakeTimeout <= 0 {
		handshakeTimeout = 10 * time.Second
	}
	l := &tlsListener{Listener: ln, cfg: cfg, h2: s, timeout: handshakeTimeout,
		ready: make(chan accepted), done: make(chan struct{})}
	go l.acceptLoop()
	return l
}

type tlsListener struct {
	net.Listener
	cfg     *tls.Config
	h2      *H2
	timeout time.Duration
	ready   chan accepted // HTTP/1.1 connections, and ln's errors, for Accept
	done    chan struct{} // closed by Close
	once    sync.Once
}

type accepted struct {
	conn net.Conn
	err  error
}

// Accept returns the next connection that chose HTTP/1.1 (or nothing) by
// ALPN, its handshake done.
func (l *tlsListener) Accept() (net.Conn, error) {
	select {
	case a := <-l.ready:
		return a.conn, a.err
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops accepting. Handshakes under way end by themselves and close
// their connections, whatever protocol they chose.
func (l *tlsListener) Close() error {
	err := net.ErrClosed
	l.once.Do(func() {
		close(l.done)
		err = l.Listener.Close()
	})
	return err
}

func (l *tlsListener) acceptLoop() {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			// Every error goes to Accept, whose caller decides: net/http
			// backs off after a temporary one (too many open files), and
			// its next Accept paces this loop.
			select {
			case l.ready <- accepted{err: err}:
			case <-l.done:
				return
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		go l.handshake(conn)
	}
}

func (l *tlsListener) handshake(conn net.Conn) {
	pc := &pollConn{Conn: conn}
	tc := tls.Server(pc, l.cfg)
	conn.SetDeadline(time.Now().Add(l.timeout))
	if err := tc.Handshake(); err != nil {
		conn.Close()
		l.h2.logf("tls handshake failed", "remote", conn.RemoteAddr().String(), "err", err)
		return
	}
	conn.SetDeadline(time.Time{})
	if st := tc.ConnectionState(); st.NegotiatedProtocol == "h2" {
		select {
		case <-l.done:
			conn.Close()
		default:
			l.h2.serve(tc, &st, false, pc)
		}
		return
	}
	select {
	case l.ready <- accepted{conn: tc}:
	case <-l.done:
		conn.Close()
	}
}

// pollConn is the socket under a connection read through the Poller.
// Until it is made non-blocking it reads as its Conn does (a TLS
// handshake, a preface); after, a read that would wait fails at once
// with errWouldBlock. crypto/tls passes that error up without failing
// the connection, as it does a read deadline, and resumes a record read
// in part on the next Read.
type pollConn struct {
	net.Conn
	rc       syscall.RawConn
	nonblock atomic.Bool
}

// makeNonblocking switches c to reads that never wait. It fails when c is
// not a plain socket.
func (c *pollConn) makeNonblocking() error {
	sock := socket(c.Conn)
	if sock == nil {
		return errors.ErrUnsupported
	}
	rc, err := sock.SyscallConn()
	if err != nil {
		return err
	}
	c.rc = rc
	c.nonblock.Store(true)
	return nil
}

func (c *pollConn) Read(p []byte) (int, error) {
	if !c.nonblock.Load() {
		return c.Conn.Read(p)
	}
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var rerr error
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = syscall.Read(int(fd), p)
			if rerr != syscall.EINTR {
				return true // never park: EAGAIN ends this round
			}
		}
	})
	if err == nil {
		err = rerr
	}
	switch {
	case errors.Is(err, syscall.EAGAIN):
		return 0, errWouldBlock
	case err != nil:
		return 0, err
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// errWouldBlock is a read of a pollConn that found nothing to read. It is
// a temporary net.Error, so that crypto/tls keeps the connection usable.
var errWouldBlock net.Error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "read would block" }
func (wouldBlock) Timeout() bool   { return true }
func (wouldBlock) Temporary() bool { return true }
