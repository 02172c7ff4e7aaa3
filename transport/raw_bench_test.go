package transport

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// BenchmarkRawWriteEvents is the transport's share of one delivery: an
// SSE stream on a loopback TCP connection taken over from net/http,
// written batches of 204-byte frames while a client reads them. One op is
// one WriteEvents call; the system call dominates.
func BenchmarkRawWriteEvents(b *testing.B) {
	for _, n := range []int{1, 4} {
		b.Run(fmt.Sprintf("frames=%d", n), func(b *testing.B) {
			st, stop := rawStream(b)
			defer stop()
			frame := Encode(FormatSSE, 1, bytes.Repeat([]byte("x"), 190))
			frames := make([][]byte, n)
			for i := range frames {
				frames[i] = frame
			}
			b.SetBytes(int64(n * len(frame)))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := st.WriteEvents(frames); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// rawStream serves one SSE stream on 127.0.0.1 and starts a client that
// reads it to the end; stop closes both and waits for them.
func rawStream(b *testing.B) (*Raw, func()) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	streams := make(chan *Raw, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st, err := HijackSSE(w, r, Options{WriteTimeout: 10 * time.Second}, false, nil)
		if err != nil {
			b.Error(err)
			close(streams)
			return
		}
		streams <- st
	})}
	go srv.Serve(ln)
	read := make(chan error, 1)
	go func() {
		resp, err := http.Get("http://" + ln.Addr().String() + "/")
		if err != nil {
			read <- err
			return
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		read <- err
	}()
	var st *Raw
	select {
	case s, ok := <-streams:
		if !ok {
			b.FailNow()
		}
		st = s
	case err := <-read: // the client failed before the stream opened
		b.Fatalf("client: %v", err)
	}
	return st, func() {
		st.Close(ReasonEnded)
		if err := <-read; err != nil {
			b.Error(err)
		}
		srv.Close()
	}
}
