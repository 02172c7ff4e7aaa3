package transport

import (
	"net"
	"testing"
	"time"
)

// TestLimitListener: past the cap a connection gets the refusal and is
// closed at once; closing an accepted one (even twice) frees one slot; and
// writes to an accepted connection go to the socket itself, where
// net.Buffers uses one writev.
func TestLimitListener(t *testing.T) {
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := NewLimitListener(tcp, 1, []byte("full\n"))
	defer ln.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", tcp.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c
	}
	c1 := dial()
	defer c1.Close()
	s1 := <-accepted
	if _, ok := writerOf(s1).(*net.TCPConn); !ok {
		t.Fatalf("writes go to %T, not the socket", writerOf(s1))
	}
	c2 := dial()
	defer c2.Close()
	b := make([]byte, 16)
	n, _ := c2.Read(b)
	if string(b[:n]) != "full\n" {
		t.Fatalf("past the cap: read %q, want the refusal", b[:n])
	}
	if _, err := c2.Read(b); err == nil {
		t.Fatal("a refused connection stayed open")
	}
	s1.Close()
	s1.Close()
	if ln.Open() != 0 {
		t.Fatalf("%d open after closing the only one twice", ln.Open())
	}
	c3 := dial()
	defer c3.Close()
	select {
	case s3 := <-accepted:
		s3.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("a freed slot did not take a new connection")
	}
}
