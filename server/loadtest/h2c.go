package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// dialH2C opens the stream at path over cleartext HTTP/2, one connection
// for it, with a client as lean as the HTTP/1.1 one: frames read off a
// buffered reader and DATA handed on, no goroutine of its own. Its windows
// are opened all the way at the start, so it never sends a WINDOW_UPDATE.
func dialH2C(s *server, path string) (net.Conn, io.Reader, error) {
	addr := strings.TrimPrefix(s.base, "http://")
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	fr := http2.NewFramer(conn, bufio.NewReader(conn))
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", addr}, {":path", path},
		{"accept", "text/event-stream"}, {"authorization", "Bearer " + s.viewer}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	_, err = io.WriteString(conn, http2.ClientPreface)
	if err == nil {
		err = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	}
	if err == nil {
		err = fr.WriteWindowUpdate(0, 1<<31-1-65535)
	}
	if err == nil {
		err = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true})
	}
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	r := &h2cBody{fr: fr}
	for r.status == "" {
		if err := r.next(); err != nil {
			conn.Close()
			return nil, nil, err
		}
	}
	if r.status != "200" {
		conn.Close()
		return nil, nil, fmt.Errorf("stream: status %s", r.status)
	}
	return conn, r, nil
}

// h2cBody reads the body of stream 1.
type h2cBody struct {
	fr     *http2.Framer
	status string
	rest   []byte
	eof    bool
}

func (r *h2cBody) next() error {
	f, err := r.fr.ReadFrame()
	if err != nil {
		return err
	}
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		r.status = f.PseudoValue("status")
	case *http2.DataFrame:
		r.rest = f.Data() // valid until the next ReadFrame: read out first
		r.eof = f.StreamEnded()
	case *http2.RSTStreamFrame, *http2.GoAwayFrame:
		r.eof = true
	}
	return nil
}

func (r *h2cBody) Read(p []byte) (int, error) {
	for len(r.rest) == 0 {
		if r.eof {
			return 0, io.EOF
		}
		if err := r.next(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.rest)
	r.rest = r.rest[n:]
	return n, nil
}
