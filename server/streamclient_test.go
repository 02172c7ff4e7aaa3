package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// msg is one thing a stream client received: an event or a notice.
type msg struct {
	ID      int64  `json:"id"`
	Type    string `json:"type"`
	RigID   string `json:"rig_id"`
	AgentID string `json:"agent_id"`
	Agent   string `json:"agent"` // a town stream's gap notice: whose events
	Notice  string `json:"notice"`
	After   int64  `json:"after"`
	FirstID int64  `json:"first_id"`
}

// streamClient reads one stream. Next returns io.EOF when the server ended
// it cleanly (SSE/NDJSON response end, WS close 1000).
type streamClient interface {
	Next() (msg, error)
	Raw() []byte // the JSON of the last message Next returned
	Close()
	Proto() string
}

// nextRaw is Next with the message's JSON.
func nextRaw(c streamClient) (msg, json.RawMessage, error) {
	m, err := c.Next()
	return m, c.Raw(), err
}

// The transports every stream test runs on.
var transports = []string{"sse-h1", "sse-h2c", "sse-h2tls", "ws", "ndjson"}

// tlsFront serves the env's API over TLS (HTTP/2 by ALPN) on another port,
// with a certificate made for the test, and returns its base URL and a
// client that trusts it.
func (e *testEnv) tlsFront() (string, *http.Client) {
	e.t.Helper()
	cert, key, pool := selfSigned(e.t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	hs := newHTTPServer(e.api, e.api.log, 0, 0)
	hs.TLSConfig = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key}}}
	go hs.ServeTLS(ln, "", "")
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	e.t.Cleanup(func() {
		hs.Close()
		tr.CloseIdleConnections()
	})
	return "https://" + ln.Addr().String(), &http.Client{Transport: tr}
}

// h2cClient speaks cleartext HTTP/2 with prior knowledge.
func h2cClient(t testing.TB) *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: p}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// ticket asks for a stream ticket and returns its stream_path.
func (e *testEnv) ticket(agent string) string {
	e.t.Helper()
	code, _, v := e.do("POST", "/api/towns/t1/container/agents/"+agent+"/stream-ticket", e.viewer, "", nil)
	if code != 201 {
		e.t.Fatalf("ticket: %d %v", code, v)
	}
	return v["stream_path"].(string)
}

// townTicket asks for a ticket of town t1's stream and returns its
// stream_path.
func (e *testEnv) townTicket() string {
	e.t.Helper()
	code, _, v := e.do("POST", "/api/towns/t1/stream-ticket", e.viewer, "", nil)
	if code != 201 {
		e.t.Fatalf("town ticket: %d %v", code, v)
	}
	return v["stream_path"].(string)
}

// openTown opens town t1's stream on transport kind with a fresh ticket,
// narrowed by query (a filter such as "rig=r1&types=step"; may be empty),
// resuming after cursor.
func (e *testEnv) openTown(kind, query string, cursor int64) (streamClient, int) {
	e.t.Helper()
	path := e.townTicket()
	if query != "" {
		path += "&" + query
	}
	return e.openPath(kind, path, cursor, nil)
}

// open opens a stream of agent on transport kind with a fresh ticket,
// resuming after cursor (Last-Event-ID for SSE, ?after for the others).
// It returns the client, or the HTTP status of a refusal.
func (e *testEnv) open(kind, agent string, cursor int64) (streamClient, int) {
	e.t.Helper()
	path := e.ticket(agent)
	return e.openPath(kind, path, cursor, nil)
}

func (e *testEnv) openPath(kind, path string, cursor int64, hdr http.Header) (streamClient, int) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	if kind == "ws" {
		d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(hdr), Timeout: 10 * time.Second}
		u := "ws" + strings.TrimPrefix(e.base, "http") + path + "&after=" + strconv.FormatInt(cursor, 10)
		conn, br, _, err := d.Dial(ctx, u)
		if err != nil {
			cancel()
			var se ws.StatusError
			if errors.As(err, &se) {
				return nil, int(se)
			}
			e.t.Fatalf("ws dial: %v", err)
		}
		conn.SetDeadline(time.Now().Add(60 * time.Second))
		rw := io.ReadWriter(conn)
		if br != nil {
			rw = struct {
				io.Reader
				io.Writer
			}{io.MultiReader(br, conn), conn}
		}
		return &wsClient{conn: conn, rw: rw, cancel: cancel}, 101
	}
	base, client := e.base, e.client
	switch kind {
	case "sse-h2c":
		client = h2cClient(e.t)
	case "sse-h2tls":
		base, client = e.tlsFront()
	}
	req, _ := http.NewRequestWithContext(ctx, "GET", base+path, nil)
	for k, v := range hdr {
		req.Header[k] = v
	}
	if kind == "ndjson" {
		req.Header.Set("Accept", "application/x-ndjson")
		req.URL.RawQuery += "&after=" + strconv.FormatInt(cursor, 10)
	} else if cursor > 0 {
		req.Header.Set("Last-Event-ID", strconv.FormatInt(cursor, 10))
	}
	resp, err := client.Do(req)
	if err != nil {
		cancel()
		e.t.Fatalf("%s: %v", kind, err)
	}
	if resp.StatusCode != 200 {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		cancel()
		return nil, resp.StatusCode
	}
	want := map[string]string{"sse-h1": "HTTP/1.1", "sse-h2c": "HTTP/2.0", "sse-h2tls": "HTTP/2.0", "ndjson": "HTTP/1.1"}[kind]
	if resp.Proto != want {
		e.t.Fatalf("%s: served over %s, want %s", kind, resp.Proto, want)
	}
	ct := resp.Header.Get("Content-Type")
	if (kind == "ndjson") != (ct == "application/x-ndjson") || (kind != "ndjson" && ct != "text/event-stream") {
		e.t.Fatalf("%s: Content-Type %q", kind, ct)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	c := &httpStream{resp: resp, sc: sc, cancel: cancel, ndjson: kind == "ndjson"}
	return c, 200
}

type httpStream struct {
	resp   *http.Response
	sc     *bufio.Scanner
	cancel context.CancelFunc
	ndjson bool
	raw    []byte
}

func (c *httpStream) Raw() []byte { return c.raw }

func (c *httpStream) Proto() string { return c.resp.Proto }
func (c *httpStream) Close()        { c.cancel(); c.resp.Body.Close() }

func (c *httpStream) Next() (msg, error) {
	var event, data string
	for c.sc.Scan() {
		line := c.sc.Text()
		if c.ndjson {
			if line == "" {
				continue // keepalive
			}
			var m msg
			c.raw = []byte(line)
			return m, json.Unmarshal(c.raw, &m)
		}
		switch {
		case line == "":
			if data == "" {
				event = ""
				continue // retry: or keepalive block
			}
			var m msg
			c.raw = []byte(data)
			if err := json.Unmarshal(c.raw, &m); err != nil {
				return m, err
			}
			if event != "" {
				m.Notice = event
			}
			return m, nil
		case strings.HasPrefix(line, "data: "):
			data = strings.TrimPrefix(line, "data: ")
		case strings.HasPrefix(line, "event: "):
			event = strings.TrimPrefix(line, "event: ")
		}
	}
	if err := c.sc.Err(); err != nil {
		return msg{}, err
	}
	return msg{}, io.EOF
}

type wsClient struct {
	conn   net.Conn
	rw     io.ReadWriter
	cancel context.CancelFunc
	raw    []byte
}

func (c *wsClient) Raw() []byte { return c.raw }

func (c *wsClient) Proto() string { return "HTTP/1.1" }
func (c *wsClient) Close()        { c.cancel(); c.conn.Close() }

func (c *wsClient) Next() (msg, error) {
	data, _, err := wsutil.ReadServerData(c.rw)
	if err != nil {
		var ce wsutil.ClosedError
		if errors.As(err, &ce) && ce.Code == ws.StatusNormalClosure {
			return msg{}, io.EOF
		}
		return msg{}, err
	}
	var m msg
	c.raw = data
	return m, json.Unmarshal(data, &m)
}

// closeCode reads until the server closes and returns its close code.
func (c *wsClient) closeCode() (ws.StatusCode, error) {
	for {
		_, _, err := wsutil.ReadServerData(c.rw)
		var ce wsutil.ClosedError
		if errors.As(err, &ce) {
			return ce.Code, nil
		}
		if err != nil {
			return 0, err
		}
	}
}

func jsonDecode(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }
