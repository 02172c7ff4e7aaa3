package container

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// Serve runs the control API on addr until ctx ends, then stops every agent
// (SIGTERM, SIGKILL after the grace period) and the listener. ready, if not
// nil, is called with the listening address.
func Serve(ctx context.Context, addr, secret string, opts Options, ready func(net.Addr)) error {
	if len(secret) < MinSecretLen {
		return fmt.Errorf("%s is %d bytes; the control API needs a secret of at least %d", SecretEnv, len(secret), MinSecretLen)
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	c := New(opts)
	srv := &http.Server{
		Handler:           c.Handler(secret),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(opts.Log.Handler(), slog.LevelWarn),
	}
	opts.Log.Info("container listening", "addr", ln.Addr().String())
	if ready != nil {
		ready(ln.Addr())
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	select {
	case err = <-serveErr:
	case <-ctx.Done():
	}
	opts.Log.Info("container shutting down: stopping agents")
	grace := c.opts.Grace + 5*time.Second
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	// Agents first, while the API still answers: a relay polling now can
	// still read their agent.exited events.
	if cerr := c.Close(sctx); cerr != nil {
		opts.Log.Warn("agents still running at shutdown were killed", "err", cerr)
	}
	if serr := srv.Shutdown(sctx); serr != nil {
		srv.Close()
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}
