package transport

import (
	"bytes"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// FuzzH2Input: whatever a client sends after the preface, and however the
// socket splits it into reads, the server's frame reading does not panic,
// and where the reads split does not change whether the connection is
// failed: the bytes in one read or in two end it alike.
func FuzzH2Input(f *testing.F) {
	for _, seed := range h2Seeds(f) {
		f.Add(seed, uint16(len(seed)/2))
	}
	f.Fuzz(func(t *testing.T, data []byte, split uint16) {
		i := int(split) % (len(data) + 1)
		whole := feedH2(data)
		parts := feedH2(data[:i], data[i:])
		if (whole == nil) != (parts == nil) {
			t.Fatalf("in one read: %v; split at %d: %v", whole, i, parts)
		}
	})
}

// feedH2 hands reads to a new connection as its Poller path does, until one
// fails, and returns that failure. Handlers wait for their stream to end,
// so that nothing they do races the reads.
func feedH2(reads ...[]byte) error {
	s := &H2{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
	}), Opts: Options{WriteTimeout: time.Second}}
	c, _ := s.newConn(discardConn{}, nil)
	c.fr = newFramer(&c.feed)
	var err error
	for _, b := range reads {
		if err = c.consume(b); err != nil {
			break
		}
	}
	if err != nil {
		c.fail(err)
	} else {
		c.close(net.ErrClosed)
	}
	s.handlers.Wait()
	return err
}

// h2Seeds are well-formed and ill-formed frame sequences.
func h2Seeds(f *testing.F) [][]byte {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, kv := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":authority", "a"}, {":path", "/x"}} {
		enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
	}
	block := hb.Bytes()
	seq := func(write func(fr *http2.Framer)) []byte {
		var b bytes.Buffer
		write(http2.NewFramer(&b, nil))
		return b.Bytes()
	}
	return [][]byte{
		seq(func(fr *http2.Framer) {
			fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
			fr.WriteWindowUpdate(0, 1<<20)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true})
			fr.WriteData(1, false, bytes.Repeat([]byte("a"), 1000))
			fr.WriteData(1, true, []byte("end"))
			fr.WritePing(false, [8]byte{1})
			fr.WriteRSTStream(1, http2.ErrCodeCancel)
			fr.WriteGoAway(0, http2.ErrCodeNo, nil)
		}),
		seq(func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block[:3]})
			fr.WriteContinuation(3, false, block[3:5])
			fr.WriteContinuation(3, true, block[5:])
			fr.WriteSettingsAck()
			fr.WritePriority(3, http2.PriorityParam{StreamDep: 1, Weight: 7})
		}),
		seq(func(fr *http2.Framer) {
			fr.WriteData(5, false, []byte("data on an idle stream"))
		}),
		seq(func(fr *http2.Framer) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true, EndStream: true})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true})
		}),
		{0xff, 0xff, 0xff, 0x0, 0x0, 0x0, 0x0, 0x0, 0x1}, // longer than any frame allowed
		[]byte("GET / HTTP/1.1\r\n\r\n"),
	}
}

// discardConn takes every write and has nothing to read.
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error)      { return len(p), nil }
func (discardConn) Close() error                     { return nil }
func (discardConn) SetWriteDeadline(time.Time) error { return nil }
func (discardConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
