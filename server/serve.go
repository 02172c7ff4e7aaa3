package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/server/container"
	"github.com/agentstream/agentstream/transport"
)

// Config is what `agentstream serve` runs with.
type Config struct {
	Addr    string // listen address, e.g. 127.0.0.1:8080 (port 0 picks one)
	DataDir string // holds the SQLite file and the generated secret
	DB      string // "sqlite:PATH" or "postgres://..."; default sqlite:DataDir/agentstream.db
	Secret  string // AGENTSTREAM_SECRET; empty: the one in DataDir
	// SecretFile holds the signing secret instead (--secret-file), for
	// instances that share one; it wins over Secret and DataDir.
	SecretFile string
	Retain     int // events kept per agent (0: model.DefaultRetain)

	// PollInterval is how often a feed polls the database for events other
	// writers added (default 500 ms).
	PollInterval time.Duration

	WriteTimeout time.Duration // drop a stream client that accepts no bytes this long (10 s)
	Keepalive    time.Duration // SSE comment / WS ping interval (30 s)
	Origins      []string      // more origins allowed to open WebSockets
	TLSCert      string        // with TLSKey: serve HTTPS, HTTP/2 by ALPN
	TLSKey       string

	// Limits bound what one client, agent or town may take (see Limits).
	Limits Limits
	// NoDeliveryHistogram turns off agentstream_stream_delivery_seconds
	// (--delivery-histogram=false).
	NoDeliveryHistogram bool
	// NetHTTP2 serves HTTP/2 with net/http's server instead of
	// agentstream's own (--net-http2; see docs/streaming.md).
	NetHTTP2 bool
	// MaxConns caps open connections; 0: the open-file limit less
	// ConnReserve. Past it a connection is refused at once.
	MaxConns int
	// ReadHeaderTimeout bounds the time to read a request's headers
	// (default 10 s); IdleTimeout how long a keep-alive connection waits
	// for its next request (default 2 min).
	ReadHeaderTimeout time.Duration
	IdleTimeout       time.Duration

	// IdempotencyWindow is how long ingest remembers an Idempotency-Key
	// (default 24 h).
	IdempotencyWindow time.Duration

	// Demo, when set, replays these sessions as live agents of DemoTown.
	Demo [][]RecordedEvent

	// Upstream, when set, is an agent container's control API (`agentstream
	// container`) whose agents are relayed into the store as agents of
	// UpstreamTown and UpstreamRig (see Relay).
	Upstream       string
	UpstreamSecret string
	UpstreamTown   string
	UpstreamRig    string
	// UpstreamBusyInterval is the time between pulls of an agent whose last
	// pull brought events (default PollInterval/5; see poll.Options).
	UpstreamBusyInterval time.Duration

	// DrainTimeout bounds the stop after ctx ends: in-flight requests and
	// streams get this long to finish, then their connections are closed
	// (default DefaultDrainTimeout).
	DrainTimeout time.Duration
	Ready        func(net.Addr) // called once listening, with the address
	Log          *slog.Logger
	Out          io.Writer // where the dashboard link is printed
}

// loadKeyPair reads a TLS certificate and key, with errors that name the
// flag of the file at fault.
func loadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("--tls-cert: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("--tls-key: %w", err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("--tls-cert %s and --tls-key %s: %w", certFile, keyFile, err)
	}
	return c, nil
}

// Serve runs the server until ctx ends, then stops accepting, lets in-flight
// requests finish, and closes the store. It returns nil after a clean stop.
func Serve(ctx context.Context, cfg Config) error {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	// The certificate first: a missing or bad file is an error naming its
	// flag, before anything listens or logs an https address.
	var cert *tls.Certificate
	if cfg.TLSCert != "" {
		c, err := loadKeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return err
		}
		cert = &c
	}
	var secret []byte
	var err error
	if cfg.SecretFile != "" {
		secret, err = ReadSecretFile(cfg.SecretFile)
	} else {
		secret, err = LoadSecret(cfg.Secret, cfg.DataDir)
	}
	if err != nil {
		return err
	}
	auth, err := NewAuth(secret)
	if err != nil {
		return err
	}
	dsn := cfg.DB
	if dsn == "" {
		dsn = "sqlite:" + filepath.Join(cfg.DataDir, DBFile)
	}
	store, err := model.Open(ctx, dsn, model.Options{Retain: cfg.Retain, Logger: log})
	if err != nil {
		return err
	}
	defer store.Close()
	popts := poll.Options{Interval: cfg.PollInterval, BusyInterval: cfg.UpstreamBusyInterval, Logger: log,
		MinRetained: store.Retain()}
	var relay *Relay
	if cfg.Upstream != "" {
		client := &container.Client{URL: cfg.Upstream, Secret: cfg.UpstreamSecret, HTTP: &http.Client{Timeout: 10 * time.Second}}
		relay = NewRelay(client, store, cfg.UpstreamTown, cfg.UpstreamRig, log)
		popts.Upstream = relay
	}
	sched := poll.New(store, popts)
	defer sched.Close()

	tcp, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	maxConns := cfg.MaxConns
	if maxConns <= 0 {
		maxConns = DefaultMaxConns()
	}
	var refusal []byte
	if cfg.TLSCert == "" {
		refusal = connRefusal
	}
	ln := transport.NewLimitListener(tcp, maxConns, refusal)
	poller, err := transport.NewPoller()
	if err != nil {
		log.Info("no poller: each stream reads its client on a goroutine", "err", err)
	} else {
		defer poller.Close()
	}
	api := New(store, sched, auth, Options{Log: log, WriteTimeout: cfg.WriteTimeout, Keepalive: cfg.Keepalive,
		Origins: cfg.Origins, Poller: poller, Limits: cfg.Limits, NoDeliveryHistogram: cfg.NoDeliveryHistogram,
		NetHTTP2: cfg.NetHTTP2})
	ln.OnRefuse = func() { api.metrics.refused.WithLabelValues("connections").Inc() }
	srv := newHTTPServer(api, log, cfg.ReadHeaderTimeout, cfg.IdleTimeout)
	if relay != nil {
		api.metrics.reg.MustRegister(relay.Collectors()...)
	}
	addr := ln.Addr().String()
	scheme := "http"
	if cfg.TLSCert != "" {
		scheme = "https"
	}
	log.Info("listening", "addr", addr, "url", scheme+"://"+addr+"/", "db", dsn, "max_conns", maxConns)
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr())
	}

	var wg sync.WaitGroup
	bgCtx, stopBackground := context.WithCancel(ctx) // the demo and the ticket sweeper
	defer stopBackground()
	if len(cfg.Demo) > 0 {
		viewer, err := auth.MintViewer(DemoTown, 24*time.Hour)
		if err != nil {
			return err
		}
		if cfg.Out != nil {
			fmt.Fprintf(cfg.Out, "\nagentstream demo: open %s://%s/#token=%s\n\n", scheme, linkHost(ln.Addr()), viewer)
		}
		d := &Demo{Store: store, Sessions: cfg.Demo, Log: log, Pause: 3 * time.Second}
		wg.Go(func() {
			if err := d.Run(bgCtx); err != nil && !errors.Is(err, context.Canceled) {
				log.Error("demo", "err", err)
			}
		})
	}

	window := cfg.IdempotencyWindow
	if window <= 0 {
		window = DefaultIdempotencyWindow
	}
	wg.Go(func() { sweep(bgCtx, store, window, log) })
	// On a shared database, other instances' commits wake the feeds at
	// once; without it (or while it is down) they are seen on the poll.
	wg.Go(func() {
		if err := store.Listen(bgCtx, sched.NotifyKeys); err != nil && !errors.Is(err, model.ErrNoListen) && bgCtx.Err() == nil {
			log.Error("listen", "err", err)
		}
	})
	if relay != nil {
		// New agents are listed as often as busy ones are pulled, so that a
		// fast agent's first pull comes before its ring wraps.
		interval := cfg.UpstreamBusyInterval
		if interval <= 0 {
			interval = max(cfg.PollInterval, 0) / 5
		}
		if interval <= 0 {
			interval = 100 * time.Millisecond
		}
		log.Info("relaying upstream container", "upstream", cfg.Upstream, "town", cfg.UpstreamTown, "rig", cfg.UpstreamRig)
		wg.Go(func() { relay.Watch(bgCtx, sched, interval) })
	}

	serveErr := make(chan error, 1)
	go func() {
		if cert != nil {
			if srv.TLSConfig == nil {
				srv.TLSConfig = &tls.Config{}
			}
			srv.TLSConfig.Certificates = []tls.Certificate{*cert}
			serveErr <- srv.ServeTLS(ln, "", "")
			return
		}
		serveErr <- srv.Serve(ln)
	}()
	select {
	case err := <-serveErr:
		stopBackground()
		wg.Wait()
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	timeout := cfg.DrainTimeout
	if timeout <= 0 {
		timeout = DefaultDrainTimeout
	}
	log.Info("shutting down", "drain_timeout", timeout)
	// Stop taking work at once: readiness says no, new streams and posts
	// are refused, and Shutdown closes the listener (new connections are
	// refused) and idle connections first thing. In-flight requests and
	// streams then get the drain timeout to finish.
	api.BeginDrain()
	srv.SetKeepAlivesEnabled(false)
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(sctx) }()
	stopBackground()
	// Shutdown waits for neither an SSE response that never ends by itself
	// nor a hijacked connection: Drain ends those.
	if err := api.Drain(sctx); err != nil {
		log.Warn("streams still writing at the drain timeout were cut off", "err", err)
	}
	if err := <-shut; err != nil {
		log.Warn("requests still running at the drain timeout were cut off", "err", err)
		srv.Close()
	}
	wg.Wait()
	log.Info("stopped")
	return nil
}

// DefaultDrainTimeout is how long a stopping server gives in-flight
// requests and streams to finish.
const DefaultDrainTimeout = 10 * time.Second

// httpServer is the HTTP server agentstream runs: net/http's for HTTP/1.1,
// with HTTP/2 handed to agentstream's own (transport.H2) unless the
// Options say otherwise.
type httpServer struct {
	*http.Server
	h2 *transport.H2 // nil: net/http serves HTTP/2 too
}

// newHTTPServer serves api with HTTP/1.1 and HTTP/2 on one port — HTTP/2
// by ALPN over TLS, and as cleartext h2c with prior knowledge — so a
// browser multiplexes many agent streams over one connection instead of
// six per host.
//
// There is no ReadTimeout or WriteTimeout: they would cut streams, which
// last as long as their agent. Headers have ReadHeaderTimeout, bodies the
// handlers' own deadline (Limits.BodyTimeout), streams their write
// timeout and keepalives.
func newHTTPServer(api *Server, log *slog.Logger, readHeader, idle time.Duration) *httpServer {
	if readHeader <= 0 {
		readHeader = DefaultReadHeaderTimeout
	}
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	protocols.SetUnencryptedHTTP2(true)
	hs := &httpServer{Server: &http.Server{
		Handler:           api,
		Protocols:         protocols,
		ReadHeaderTimeout: readHeader,
		IdleTimeout:       idle,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}}
	if !api.netHTTP2 {
		hs.h2 = &transport.H2{Handler: api, Opts: api.streamOpts, IdleTimeout: idle, Log: log}
		hs.h2.Install(hs.Server)
	}
	return hs
}

// ServeTLS serves HTTPS with the server's TLSConfig (and the certificate
// in certFile and keyFile, if given); HTTP/2 is offered by ALPN. With
// agentstream's own HTTP/2 server, TLS is terminated by its listener, so
// that HTTP/2 connections never pass through net/http (see
// transport.H2.TLSListener).
func (hs *httpServer) ServeTLS(ln net.Listener, certFile, keyFile string) error {
	if hs.h2 == nil {
		return hs.Server.ServeTLS(ln, certFile, keyFile)
	}
	cfg := &tls.Config{}
	if hs.TLSConfig != nil {
		cfg = hs.TLSConfig.Clone()
	}
	// As net/http's ServeTLS: the files, when given or when the config
	// has no certificate of its own, are the certificate.
	hasCert := len(cfg.Certificates) > 0 || cfg.GetCertificate != nil || cfg.GetConfigForClient != nil
	if !hasCert || certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return err
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if !slices.Contains(cfg.NextProtos, "h2") {
		cfg.NextProtos = append([]string{"h2"}, cfg.NextProtos...)
	}
	if !slices.Contains(cfg.NextProtos, "http/1.1") {
		cfg.NextProtos = append(cfg.NextProtos, "http/1.1")
	}
	return hs.Server.Serve(hs.h2.TLSListener(ln, cfg, hs.ReadHeaderTimeout))
}

// Shutdown stops both servers gracefully: no new connections or streams,
// and requests in flight finish, until ctx ends.
func (hs *httpServer) Shutdown(ctx context.Context) error {
	if hs.h2 == nil {
		return hs.Server.Shutdown(ctx)
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.h2.Shutdown(ctx) }()
	err := hs.Server.Shutdown(ctx)
	return errors.Join(err, <-errc)
}

// Close closes every connection at once.
func (hs *httpServer) Close() error {
	err := hs.Server.Close()
	if hs.h2 != nil {
		hs.h2.Close()
	}
	return err
}

// Timeouts of the HTTP server (see docs/limits.md).
const (
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultIdleTimeout       = 2 * time.Minute
)

// ConnReserve is how many file descriptors the default connection cap
// leaves for everything else: the database and its WAL, the listener, the
// epoll instance, logs, and agent processes' pipes in a relay.
const ConnReserve = 128

// DefaultMaxConns is the default cap on open connections: the open-file
// limit (which Go raises to its hard limit at start) less ConnReserve.
func DefaultMaxConns() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 1024 - ConnReserve
	}
	return maxConnsFromLimit(rl.Cur, ConnReserve)
}

// connRefusal is written to a cleartext connection refused past the cap.
var connRefusal = []byte("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n" +
	"Connection: close\r\nContent-Length: 104\r\n\r\n" +
	`{"error":{"code":"too_many_connections","message":"The server holds its limit of connections; retry."}}` + "\n")

// DefaultIdempotencyWindow is how long an Idempotency-Key is remembered.
const DefaultIdempotencyWindow = 24 * time.Hour

// sweep deletes, once a minute, expired stream tickets and idempotency
// keys older than window.
func sweep(ctx context.Context, store *model.Store, window time.Duration, log *slog.Logger) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
		if _, err := store.SweepTickets(ctx, time.Now().Add(-time.Minute)); err != nil && ctx.Err() == nil {
			log.Error("sweep tickets", "err", err)
		}
		if _, err := store.SweepKeys(ctx, time.Now().Add(-window)); err != nil && ctx.Err() == nil {
			log.Error("sweep idempotency keys", "err", err)
		}
	}
}

// linkHost is the host:port a person on this machine opens: a wildcard
// listen address becomes 127.0.0.1.
func linkHost(a net.Addr) string {
	tcp, ok := a.(*net.TCPAddr)
	if !ok || !tcp.IP.IsUnspecified() {
		return a.String()
	}
	return net.JoinHostPort("127.0.0.1", fmt.Sprint(tcp.Port))
}
