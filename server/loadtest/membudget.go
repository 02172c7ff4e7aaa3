package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"
)

// memBudget measures what streams that never read cost the server: it
// posts a history of 64 KiB events, opens n streams that read nothing
// (SSE over one HTTP/2 connection, as a browser multiplexes them, and SSE
// over HTTP/1.1 connections with a small receive buffer), waits until the
// server stops getting bytes out, and reports the growth of its RSS per
// stream against the 256 KiB a stream may hold.
func memBudget(bin string, n, history int) {
	for _, transport := range []string{"h2c", "sse"} {
		srv := start("agentstream", bin)
		postBig(srv, history)
		time.Sleep(time.Second)
		before := srv.rss()
		closeAll := openStalled(srv, transport, n)
		settle(srv)
		after := srv.rss()
		closeAll()
		srv.stop()
		fmt.Printf("membudget %-4s %d streams that never read, %d events of 64 KiB: RSS %.1f -> %.1f MiB, %.0f KiB per stream (budget 256 KiB)\n",
			transport, n, history, before/(1<<20), after/(1<<20), (after-before)/float64(n)/1024)
	}
}

// postBig posts n events of 64 KiB data, ten to a request.
func postBig(s *server, n int) {
	pad := strings.Repeat("x", 64<<10-16)
	c := &http.Client{}
	for i := 0; i < n; i += 10 {
		evs := make([]string, min(10, n-i))
		for j := range evs {
			evs[j] = fmt.Sprintf(`{"type":"big","data":{"pad":%q}}`, pad[:len(pad)-8])
		}
		req, _ := http.NewRequest("POST", s.base+"/api/rigs/r/agent-events", strings.NewReader(`{"events":[`+strings.Join(evs, ",")+`]}`))
		req.Header.Set("Authorization", "Bearer "+s.agent)
		req.Header.Set("Content-Type", "application/json")
		resp, err := c.Do(req)
		if err != nil {
			log.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 201 {
			log.Fatalf("post: %s", resp.Status)
		}
	}
}

// openStalled opens n streams whose bodies are never read, and returns a
// function that closes them.
func openStalled(s *server, transport string, n int) func() {
	var closers []func()
	switch transport {
	case "h2c":
		p := new(http.Protocols)
		p.SetUnencryptedHTTP2(true)
		tr := &http.Transport{Protocols: p}
		c := &http.Client{Transport: tr}
		for range n {
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, "GET", s.base+s.streamPath(), nil)
			req.Header.Set("Authorization", "Bearer "+s.viewer)
			resp, err := c.Do(req)
			if err != nil || resp.StatusCode != 200 {
				log.Fatalf("h2c stream: %v %v", resp, err)
			}
			closers = append(closers, func() { cancel(); resp.Body.Close() })
		}
		closers = append(closers, tr.CloseIdleConnections)
	case "sse":
		addr := strings.TrimPrefix(s.base, "http://")
		for range n {
			d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
				return rc.Control(func(fd uintptr) {
					syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
				})
			}}
			conn, err := d.Dial("tcp", addr)
			if err != nil {
				log.Fatal(err)
			}
			fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n\r\n", s.streamPath(), addr, s.viewer)
			closers = append(closers, func() { conn.Close() })
		}
	}
	return func() {
		for _, c := range closers {
			c()
		}
	}
}

// settle waits, at most a minute, until the server has written nothing
// more to its streams for two seconds: every stream is then blocked on its
// client.
func settle(s *server) {
	last, quiet := -1.0, 0
	for i := 0; i < 120 && quiet < 4; i++ {
		time.Sleep(500 * time.Millisecond)
		cur := s.metric("agentstream_stream_bytes_written_total")
		if cur == last {
			quiet++
		} else {
			quiet = 0
		}
		last = cur
	}
}

// metric sums the series of one metric on the server's /metrics.
func (s *server) metric(name string) float64 {
	resp, err := http.Get(s.base + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, name) {
			var v float64
			fmt.Sscan(l[strings.LastIndexByte(l, ' ')+1:], &v)
			sum += v
		}
	}
	return sum
}
