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

	// Demo, when set, replays these sessions as live agents of DemoTown.
	Demo [][]RecordedEvent

	ShutdownTimeout time.Duration // for in-flight requests; default 10 s
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
	sched := poll.New(store, poll.Options{Interval: cfg.PollInterval, Logger: log})
	defer sched.Close()

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{
		Handler:           New(store, sched, auth, log),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	addr := ln.Addr().String()
	log.Info("listening", "addr", addr, "url", "http://"+addr+"/", "db", dsn)

	var wg sync.WaitGroup
	demoCtx, stopDemo := context.WithCancel(ctx)
	defer stopDemo()
	if len(cfg.Demo) > 0 {
		viewer, err := auth.MintViewer(DemoTown, 24*time.Hour)
		if err != nil {
			return err
		}
		if cfg.Out != nil {
			fmt.Fprintf(cfg.Out, "\nagentstream demo: open http://%s/#token=%s\n\n", linkHost(ln.Addr()), viewer)
		}
		d := &Demo{Store: store, Sessions: cfg.Demo, Log: log, Pause: 3 * time.Second}
		wg.Go(func() {
			if err := d.Run(demoCtx); err != nil && !errors.Is(err, context.Canceled) {
				log.Error("demo", "err", err)
			}
		})
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	select {
	case err := <-serveErr:
		stopDemo()
		wg.Wait()
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	stopDemo()
	wg.Wait()
	timeout := cfg.ShutdownTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("stopped")
	return nil
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
