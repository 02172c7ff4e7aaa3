package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
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
	DB      string // "sqlite:PATH"; default sqlite:DataDir/agentstream.db
	Secret  string // AGENTSTREAM_SECRET; empty: the one in DataDir
	Retain  int    // events kept per agent (0: model.DefaultRetain)

	// PollInterval is how often a feed polls the database for events other
	// writers added (default 500 ms).
	PollInterval time.Duration

	WriteTimeout time.Duration // drop a stream client that accepts no bytes this long (10 s)
	Keepalive    time.Duration // SSE comment / WS ping interval (30 s)
	Origins      []string      // more origins allowed to open WebSockets
	TLSCert      string        // with TLSKey: serve HTTPS, HTTP/2 by ALPN
	TLSKey       string

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

	ShutdownTimeout time.Duration  // for in-flight requests; default 10 s
	Ready           func(net.Addr) // called once listening, with the address
	Log             *slog.Logger
	Out             io.Writer // where the dashboard link is printed
}

// Serve runs the server until ctx ends, then stops accepting, lets in-flight
// requests finish, and closes the store. It returns nil after a clean stop.
func Serve(ctx context.Context, cfg Config) error {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	secret, err := LoadSecret(cfg.Secret, cfg.DataDir)
	if err != nil {
		return err
	}
	auth, err := NewAuth(secret)
	if err != nil {
		return err
	}
	dsn := cfg.DB
	if dsn == "" {
		dsn = "sqlite:" + filepath.Join(cfg.DataDir, "agentstream.db")
	}
	store, err := model.Open(ctx, dsn, model.Options{Retain: cfg.Retain, Logger: log})
	if err != nil {
		return err
	}
	defer store.Close()
	popts := poll.Options{Interval: cfg.PollInterval, BusyInterval: cfg.UpstreamBusyInterval, Logger: log}
	var relay *Relay
	if cfg.Upstream != "" {
		client := &container.Client{URL: cfg.Upstream, Secret: cfg.UpstreamSecret, HTTP: &http.Client{Timeout: 10 * time.Second}}
		relay = NewRelay(client, store, cfg.UpstreamTown, cfg.UpstreamRig, log)
		popts.Upstream = relay
	}
	sched := poll.New(store, popts)
	defer sched.Close()

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	poller, err := transport.NewPoller()
	if err != nil {
		log.Info("no poller: each stream reads its client on a goroutine", "err", err)
	} else {
		defer poller.Close()
	}
	api := New(store, sched, auth, Options{Log: log, WriteTimeout: cfg.WriteTimeout, Keepalive: cfg.Keepalive,
		Origins: cfg.Origins, Poller: poller})
	srv := newHTTPServer(api, log)
	if relay != nil {
		api.metrics.reg.MustRegister(relay.Collectors()...)
	}
	addr := ln.Addr().String()
	scheme := "http"
	if cfg.TLSCert != "" {
		scheme = "https"
	}
	log.Info("listening", "addr", addr, "url", scheme+"://"+addr+"/", "db", dsn)
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

	wg.Go(func() { sweepTickets(bgCtx, store, log) })
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
		if cfg.TLSCert != "" {
			serveErr <- srv.ServeTLS(ln, cfg.TLSCert, cfg.TLSKey)
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
	log.Info("shutting down")
	stopBackground()
	wg.Wait()
	timeout := cfg.ShutdownTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// Streams first: Shutdown waits for neither an SSE response that never
	// ends by itself nor a hijacked WebSocket.
	if err := api.Drain(sctx); err != nil {
		log.Warn("streams still open at shutdown", "err", err)
	}
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("stopped")
	return nil
}

// newHTTPServer is the http.Server agentstream runs: HTTP/1.1 and HTTP/2 on
// one port — HTTP/2 by ALPN over TLS, and as cleartext h2c with prior
// knowledge — so a browser multiplexes many agent streams over one
// connection instead of six per host.
func newHTTPServer(h http.Handler, log *slog.Logger) *http.Server {
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	protocols.SetUnencryptedHTTP2(true)
	return &http.Server{
		Handler:           h,
		Protocols:         protocols,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

// sweepTickets deletes expired stream tickets once a minute.
func sweepTickets(ctx context.Context, store *model.Store, log *slog.Logger) {
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
