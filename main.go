// Command agentstream serves live, resumable streams of AI agents' events.
//
// This file parses the command line and delegates; see DESIGN.md for the
// commands and the README for a walk-through.
package main

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/server"
	"github.com/agentstream/agentstream/server/container"
	"github.com/agentstream/agentstream/transport"
)

// demoSessions are the recorded agent sessions `serve --demo` replays.
//
//go:embed testdata/demo/*.jsonl
var demoSessions embed.FS

const usage = `agentstream: watch AI agents work, live.

Usage:
  agentstream serve  [--addr 127.0.0.1:8080] [--data ./agentstream-data] [--db URL] [--demo]
                     [--tls-cert F --tls-key F] [--origin URL ...]
                     [--upstream URL --upstream-town T --upstream-rig R]
  agentstream container [--addr 127.0.0.1:8090] [--grace 10s] [--ttl 5m]
  agentstream run   --rig R --agent A [--server URL] [--token T | --town T --data DIR] -- COMMAND [ARG...]
  agentstream emit  --rig R --agent A [--server URL] [--token T | --town T --data DIR] < events.jsonl
  agentstream token agent  --town T --rig R --agent A [--ttl 24h] [--data DIR]
  agentstream token viewer --town T [--ttl 24h] [--data DIR]
  agentstream tail  --town T [--agent A | --rig R] [--types P,...] [--server URL] [--after N] [--json] [--token T | --data DIR]
  agentstream version

Every flag also reads AGENTSTREAM_<FLAG> from the environment; a flag wins.
The container's secret is AGENTSTREAM_CONTAINER_SECRET, for container and
for serve --upstream.
Run "agentstream COMMAND -h" for a command's flags.
`

// usageError is bad usage: exit status 2 with a one-line reason.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main with its inputs and outputs passed in; it returns the exit
// status: 0 done, 1 runtime failure, 2 bad usage.
func run(args []string, stdout, stderr io.Writer) int {
	err := dispatch(args, stdout, stderr)
	var ue usageError
	var status exitStatus
	var se statusError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &status):
		return int(status)
	case errors.As(err, &se):
		fmt.Fprintf(stderr, "agentstream: %s\n", se.msg)
		return se.code
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "agentstream: %s\n", ue.msg)
		return 2
	default:
		fmt.Fprintf(stderr, "agentstream: %v\n", err)
		return 1
	}
}

func dispatch(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return usageError{"no command given"}
	}
	switch args[0] {
	case "serve":
		return cmdServe(args[1:], stdout, stderr)
	case "token":
		return cmdToken(args[1:], stdout, stderr)
	case "tail":
		return cmdTail(args[1:], stdout, stderr)
	case "container":
		return cmdContainer(args[1:], stderr)
	case "run":
		return cmdRun(args[1:], stdout, stderr)
	case "emit":
		return cmdEmit(args[1:], os.Stdin, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, version())
		return nil
	}
	fmt.Fprint(stderr, usage)
	return usageError{fmt.Sprintf("unknown command %q", args[0])}
}

// version describes this build from its build info: the module's version
// ("(devel)" for a build from a checkout), the VCS revision and time it
// was built from, whether the tree had changes, and the Go version.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "agentstream: no build information"
	}
	v := "agentstream " + bi.Main.Version
	settings := map[string]string{}
	for _, s := range bi.Settings {
		settings[s.Key] = s.Value
	}
	if rev := settings["vcs.revision"]; rev != "" {
		v += " revision " + rev
		if t := settings["vcs.time"]; t != "" {
			v += " (" + t + ")"
		}
		if settings["vcs.modified"] == "true" {
			v += " with local changes"
		}
	}
	return v + ", " + bi.GoVersion
}

// newFlags returns a FlagSet that reports errors instead of exiting, and
// whose -h prints form, the command's synopsis, before its flags.
func newFlags(name, form string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: agentstream %s\n\nFlags:\n", form)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses args, then fills every flag not given on the command line
// from AGENTSTREAM_<NAME> (upper case, '-' as '_'), so a flag wins over its
// variable.
func parse(fs *flag.FlagSet, args []string) error {
	rest, err := parseArgs(fs, args)
	if err == nil && len(rest) > 0 {
		return usageError{fmt.Sprintf("unexpected argument %q", rest[0])}
	}
	return err
}

// parseArgs is parse for a command that takes arguments after its flags
// (run's command, after "--"); it returns them.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usageError{err.Error()}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		env := "AGENTSTREAM_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok && !set[f.Name] && err == nil {
			if e := f.Value.Set(v); e != nil {
				err = usageError{fmt.Sprintf("%s=%q: %v", env, v, e)}
			}
		}
	})
	return fs.Args(), err
}

func cmdServe(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("serve", "serve [flags]", stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "listen address")
	data := fs.String("data", "./agentstream-data", "data directory: SQLite file and generated secret")
	db := fs.String("db", "", "database: sqlite:PATH (default DATA/agentstream.db)")
	retain := fs.Int("retain", 2000, "events kept per agent; older ones are pruned")
	pollEvery := fs.Duration("poll-interval", 500*time.Millisecond, "how often the database is asked, one query per watched town, for other writers' events")
	writeTimeout := fs.Duration("write-timeout", 10*time.Second, "drop a stream client that accepts no bytes for this long")
	keepalive := fs.Duration("keepalive", 30*time.Second, "interval of SSE keepalive comments and WebSocket pings")
	tlsCert := fs.String("tls-cert", "", "TLS certificate file (PEM); with --tls-key, serve HTTPS and HTTP/2")
	tlsKey := fs.String("tls-key", "", "TLS key file (PEM)")
	var origins listFlag
	fs.Var(&origins, "origin", "an origin (scheme://host[:port]) allowed to open WebSocket streams besides the server's own; repeatable, or comma-separated")
	demo := fs.Bool("demo", false, "replay recorded agent sessions in town \"demo\" and print a dashboard link")
	upstream := fs.String("upstream", "", "an agent container's control API (agentstream container) to relay agents from, e.g. http://127.0.0.1:8090")
	upTown := fs.String("upstream-town", "", "town the upstream container's agents belong to")
	upRig := fs.String("upstream-rig", "", "rig the upstream container's agents belong to")
	upBusy := fs.Duration("upstream-busy-interval", 100*time.Millisecond, "time between pulls of an upstream agent whose last pull brought events (at most --poll-interval)")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	secretFile := fs.String("secret-file", "", "file holding the signing secret, for several servers on one database that must share it (instead of --data's)")
	maxConns := fs.Int("max-conns", 0, fmt.Sprintf("most connections open at once; past it one is refused at once (default: the open-file limit less %d)", server.ConnReserve))
	townStreams := fs.Int("max-streams-per-town", server.DefaultStreamsPerTown, "most streams one town may hold open, HTTP/2 streams included; past it 429")
	townTickets := fs.Int("max-tickets-per-town", server.DefaultTicketsPerTown, "most unredeemed stream tickets one town may hold; past it 429")
	ingestEvents := fs.Float64("ingest-rate", server.DefaultIngestEvents, "events per second one agent may post, sustained; past it 429 with Retry-After")
	ingestEventBurst := fs.Int("ingest-burst", server.DefaultIngestEventBurst, "events one agent may post at once after a quiet spell (at least 1000, a full batch)")
	ingestBytes := fs.Float64("ingest-bytes-rate", server.DefaultIngestBytes, "request body bytes per second one agent may post, sustained")
	ingestByteBurst := fs.Int("ingest-bytes-burst", server.DefaultIngestByteBurst, "request body bytes one agent may post at once (at least 1 MiB, a full body)")
	readHeader := fs.Duration("read-header-timeout", server.DefaultReadHeaderTimeout, "time a client has to send a request's headers")
	bodyTimeout := fs.Duration("body-timeout", server.DefaultBodyTimeout, "time a client has to send a request's body")
	idle := fs.Duration("idle-timeout", server.DefaultIdleTimeout, "time a keep-alive connection may wait for its next request")
	drainTimeout := fs.Duration("drain-timeout", server.DefaultDrainTimeout, "on SIGTERM or SIGINT, how long in-flight requests and streams get to finish before their connections are closed")
	netHTTP2 := fs.Bool("net-http2", false, "serve HTTP/2 with net/http's server instead of agentstream's own (more memory and goroutines per stream; see docs/streaming.md)")
	deliveryHist := fs.Bool("delivery-histogram", true, "record each live event's time from commit to its stream's socket in agentstream_stream_delivery_seconds (false saves that cost; see docs/metrics.md)")
	idemWindow := fs.Duration("idempotency-window", server.DefaultIdempotencyWindow, "how long ingest remembers an Idempotency-Key (at least 24h)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *maxConns < 0 || *townStreams < 1 || *townTickets < 1 || *ingestEvents <= 0 || *ingestBytes <= 0 {
		return usageError{"--max-conns must be >= 0; --max-streams-per-town, --max-tickets-per-town, --ingest-rate and --ingest-bytes-rate must be positive"}
	}
	if *ingestEventBurst < server.MaxBatch || *ingestByteBurst < server.MaxBodyBytes {
		return usageError{fmt.Sprintf("--ingest-burst must be at least %d and --ingest-bytes-burst at least %d: a full request must fit", server.MaxBatch, server.MaxBodyBytes)}
	}
	if err := checkSecretEnv(); err != nil {
		return err
	}
	if *secretFile != "" && os.Getenv("AGENTSTREAM_SECRET") != "" {
		return usageError{"give the secret once: AGENTSTREAM_SECRET or --secret-file, not both"}
	}
	if *readHeader <= 0 || *bodyTimeout <= 0 || *idle <= 0 || *drainTimeout <= 0 {
		return usageError{"--read-header-timeout, --body-timeout, --idle-timeout and --drain-timeout must be positive"}
	}
	if *idemWindow < 24*time.Hour {
		return usageError{"--idempotency-window must be at least 24h: a client may retry a batch that long after"}
	}
	if *retain < 1 {
		return usageError{"--retain must be at least 1"}
	}
	if *pollEvery <= 0 || *writeTimeout <= 0 || *keepalive <= 0 || *upBusy <= 0 {
		return usageError{"--poll-interval, --upstream-busy-interval, --write-timeout and --keepalive must be positive"}
	}
	if (*tlsCert == "") != (*tlsKey == "") {
		return usageError{"--tls-cert and --tls-key go together"}
	}
	if *upstream != "" {
		if *upTown == "" || *upRig == "" {
			return usageError{"--upstream needs --upstream-town and --upstream-rig"}
		}
		if os.Getenv(container.SecretEnv) == "" {
			return usageError{"--upstream needs the container's secret in " + container.SecretEnv}
		}
		if u, err := url.Parse(*upstream); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return usageError{fmt.Sprintf("--upstream %q is not an http(s) URL", *upstream)}
		}
	}
	log, err := newLogger(*logFormat, stderr)
	if err != nil {
		return err
	}
	cfg := server.Config{
		Upstream: *upstream, UpstreamSecret: os.Getenv(container.SecretEnv), UpstreamTown: *upTown, UpstreamRig: *upRig,
		UpstreamBusyInterval: *upBusy,
		Addr:                 *addr, DataDir: *data, DB: *db, Retain: *retain, PollInterval: *pollEvery,
		WriteTimeout: *writeTimeout, Keepalive: *keepalive, Origins: origins,
		TLSCert: *tlsCert, TLSKey: *tlsKey,
		Secret: os.Getenv("AGENTSTREAM_SECRET"), SecretFile: *secretFile, Log: log, Out: stdout,
		MaxConns: *maxConns, ReadHeaderTimeout: *readHeader, IdleTimeout: *idle, IdempotencyWindow: *idemWindow, DrainTimeout: *drainTimeout,
		NoDeliveryHistogram: !*deliveryHist,
		NetHTTP2:            *netHTTP2,
		Limits: server.Limits{
			StreamsPerTown: *townStreams, TicketsPerTown: *townTickets, BodyTimeout: *bodyTimeout,
			IngestEvents: *ingestEvents, IngestEventBurst: *ingestEventBurst,
			IngestBytes: *ingestBytes, IngestByteBurst: *ingestByteBurst,
		},
	}
	if *demo {
		if cfg.Demo, err = loadDemo(); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return server.Serve(ctx, cfg)
}

func cmdContainer(args []string, stderr io.Writer) error {
	fs := newFlags("container", "container [flags]", stderr)
	addr := fs.String("addr", "127.0.0.1:8090", "listen address of the control API")
	grace := fs.Duration("grace", 10*time.Second, "time from SIGTERM to SIGKILL when an agent is stopped")
	ttl := fs.Duration("ttl", 5*time.Minute, "how long an exited agent's events are kept")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	agentEnv := fs.String("agent-env", "inherit", "environment agents start from: inherit (the container's, less every AGENTSTREAM_ variable) or minimal (PATH, HOME, USER, LOGNAME, SHELL, LANG, LC_ALL, TZ, TMPDIR, TERM)")
	var allow listFlag
	fs.Var(&allow, "agent-env-allow", "with --agent-env minimal, more variables agents keep; repeatable, or comma-separated")
	if err := parse(fs, args); err != nil {
		return err
	}
	secret := os.Getenv(container.SecretEnv)
	if secret == "" {
		return usageError{"container needs a bearer secret in " + container.SecretEnv}
	}
	if len(secret) < container.MinSecretLen {
		return usageError{fmt.Sprintf("%s is %d bytes; at least %d are needed (openssl rand -hex 32 makes one)", container.SecretEnv, len(secret), container.MinSecretLen)}
	}
	if *agentEnv != "inherit" && *agentEnv != "minimal" {
		return usageError{fmt.Sprintf("--agent-env %q: want inherit or minimal", *agentEnv)}
	}
	for _, name := range allow {
		if strings.HasPrefix(name, "AGENTSTREAM_") {
			return usageError{fmt.Sprintf("--agent-env-allow %s: agentstream's own variables never reach agents", name)}
		}
	}
	if *grace <= 0 || *ttl <= 0 {
		return usageError{"--grace and --ttl must be positive"}
	}
	log, err := newLogger(*logFormat, stderr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	env := container.AgentEnv(os.Environ(), *agentEnv == "minimal", allow)
	return container.Serve(ctx, *addr, secret, container.Options{Grace: *grace, TTL: *ttl, Env: env, Log: log}, nil)
}

// listFlag is a repeatable flag whose values may also be comma-separated
// (so one environment variable can carry several).
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

func loadDemo() ([][]server.RecordedEvent, error) {
	names, err := fs.Glob(demoSessions, "testdata/demo/*.jsonl")
	if err != nil {
		return nil, err
	}
	var out [][]server.RecordedEvent
	for _, name := range names {
		b, err := demoSessions.ReadFile(name)
		if err != nil {
			return nil, err
		}
		s, err := server.ParseSession(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, s)
	}
	return out, nil
}

func newLogger(format string, w io.Writer) (*slog.Logger, error) {
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, nil)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, nil)), nil
	}
	return nil, usageError{fmt.Sprintf("--log-format must be text or json, not %q", format)}
}

// tokenFlags is token's flag set for kind: an agent's has --rig and
// --agent, a viewer's does not.
type tokenFlags struct {
	fs                                 *flag.FlagSet
	town, rig, agent, data, secretFile *string
	ttl                                *time.Duration
}

func newTokenFlags(kind string, stderr io.Writer) *tokenFlags {
	form := "token viewer --town T [flags]"
	if kind == "agent" {
		form = "token agent --town T --rig R --agent A [flags]"
	}
	f := &tokenFlags{fs: newFlags("token "+kind, form, stderr)}
	fs := f.fs
	f.town = fs.String("town", "", "town the token is for")
	if kind == "agent" {
		f.rig = fs.String("rig", "", "rig of the agent")
		f.agent = fs.String("agent", "", "agent id, the token's subject")
	}
	f.ttl = fs.Duration("ttl", 24*time.Hour, "token lifetime")
	f.data = fs.String("data", "./agentstream-data", "data directory holding the server's secret (serve makes it there)")
	f.secretFile = fs.String("secret-file", "", "file holding the signing secret shared by several servers (instead of --data's)")
	return f
}

func cmdToken(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help" || args[0] == "help") {
		// The help of both kinds.
		for _, kind := range []string{"agent", "viewer"} {
			f := newTokenFlags(kind, stdout)
			f.fs.SetOutput(stdout)
			f.fs.Usage()
			fmt.Fprintln(stdout)
		}
		return nil
	}
	if len(args) == 0 || (args[0] != "agent" && args[0] != "viewer") {
		return usageError{"token needs a kind: agent or viewer (agentstream token --help)"}
	}
	kind := args[0]
	f := newTokenFlags(kind, stderr)
	if err := parse(f.fs, args[1:]); err != nil {
		return err
	}
	town, data, secretFile, ttl := f.town, f.data, f.secretFile, f.ttl
	rig, agent := new(string), new(string)
	if kind == "agent" {
		rig, agent = f.rig, f.agent
	}
	if *town == "" {
		return usageError{"--town is required"}
	}
	if kind == "agent" && (*rig == "" || *agent == "") {
		return usageError{"an agent token needs --rig and --agent"}
	}
	// The API's id rules, here: a token no endpoint would take is a
	// mistake to report now, not at the first request.
	ids := [][2]string{{"town", *town}}
	if kind == "agent" {
		ids = append(ids, [2]string{"rig", *rig}, [2]string{"agent", *agent})
	}
	for _, id := range ids {
		if msg := model.CheckID(id[0], id[1]); msg != "" {
			return usageError{"--" + id[0] + ": " + strings.TrimSuffix(msg, ".")}
		}
	}
	if *ttl <= 0 {
		return usageError{"--ttl must be positive"}
	}
	auth, err := loadAuthFrom(*data, *secretFile)
	if err != nil {
		return err
	}
	var tok string
	if kind == "agent" {
		tok, err = auth.MintAgent(*town, *rig, *agent, *ttl)
	} else {
		tok, err = auth.MintViewer(*town, *ttl)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

// checkSecretEnv refuses a set AGENTSTREAM_SECRET that is too short, as
// bad usage naming the variable.
func checkSecretEnv() error {
	if v := os.Getenv("AGENTSTREAM_SECRET"); v != "" && len(v) < server.MinSecretLen {
		return usageError{fmt.Sprintf("AGENTSTREAM_SECRET is %d bytes; at least %d are needed (openssl rand -hex 32 makes one)", len(v), server.MinSecretLen)}
	}
	return nil
}

// loadAuth is the server's token authority from AGENTSTREAM_SECRET or the
// secret in data, which the server made; it makes none.
func loadAuth(data string) (*server.Auth, error) { return loadAuthFrom(data, "") }

// loadAuthFrom is loadAuth where the secret may also be in a file of its
// own (--secret-file): then no data directory is read or made.
func loadAuthFrom(data, secretFile string) (*server.Auth, error) {
	if err := checkSecretEnv(); err != nil {
		return nil, err
	}
	env := os.Getenv("AGENTSTREAM_SECRET")
	var secret []byte
	var err error
	switch {
	case env != "" && secretFile != "":
		return nil, usageError{"give the secret once: AGENTSTREAM_SECRET or --secret-file, not both"}
	case secretFile != "":
		secret, err = server.ReadSecretFile(secretFile)
	default:
		secret, err = server.ReadSecret(env, data)
	}
	if err != nil {
		return nil, err
	}
	return server.NewAuth(secret)
}

func cmdTail(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("tail", "tail --town T [--agent A | --rig R] [flags]", stderr)
	town := fs.String("town", "", "town to follow (all its agents, unless --agent)")
	agent := fs.String("agent", "", "agent to follow; none: every agent of the town, one stream")
	rig := fs.String("rig", "", "with no --agent: only this rig's agents")
	types := fs.String("types", "", "only events whose type starts with one of these, comma-separated (agent.,message.)")
	srv := fs.String("server", "http://127.0.0.1:8080", "server base URL")
	after := fs.Int64("after", 0, "start after this event id")
	asJSON := fs.Bool("json", false, "print each event as one JSON line")
	token := fs.String("token", "", "viewer token (default: minted from the secret in --data)")
	data := fs.String("data", "./agentstream-data", "data directory holding the server's secret, when no --token is given")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *town == "" {
		return usageError{"tail needs --town (and --agent for one agent)"}
	}
	if *rig != "" && *agent != "" {
		return usageError{"--rig narrows a town's stream; with --agent there is one agent already"}
	}
	if *after < 0 {
		return usageError{"--after must be >= 0"}
	}
	if *token == "" {
		auth, err := loadAuth(*data)
		if err != nil {
			return fmt.Errorf("no --token, and no secret to mint one: %w", err)
		}
		if *token, err = auth.MintViewer(*town, time.Hour); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	u := strings.TrimRight(*srv, "/") + "/api/towns/" + url.PathEscape(*town)
	if *agent != "" {
		u += "/container/agents/" + url.PathEscape(*agent) + "/stream"
	} else {
		u += "/stream"
	}
	q := url.Values{}
	if *rig != "" {
		q.Set("rig", *rig)
	}
	if *types != "" {
		q.Set("types", *types)
	}
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	if *after == 0 {
		if msg := waitingLine(ctx, *srv, *token, *town, *agent); msg != "" {
			fmt.Fprintln(stderr, msg)
		}
	}
	err := transport.Follow(ctx, transport.FollowOptions{
		URL: u, Token: *token, After: *after,
		OnEvent: func(id int64, data []byte) bool {
			var ev struct {
				AgentID   string          `json:"agent_id"`
				Type      string          `json:"type"`
				CreatedAt string          `json:"created_at"`
				Data      json.RawMessage `json:"data"`
			}
			json.Unmarshal(data, &ev)
			switch {
			case *asJSON:
				fmt.Fprintf(stdout, "%s\n", data)
			case *agent == "":
				// A town's events, prefixed by whose they are.
				fmt.Fprintf(stdout, "%s\t%d\t%s\t%s\t%s\n", ev.AgentID, id, ev.CreatedAt, ev.Type, ev.Data)
			default:
				fmt.Fprintf(stdout, "%d\t%s\t%s\t%s\n", id, ev.CreatedAt, ev.Type, ev.Data)
			}
			// An agent's stream ends with its exit; a town's goes on.
			return *agent != "" && ev.Type == model.TypeExited
		},
		OnNotice: func(name string, data []byte) {
			fmt.Fprintln(stderr, noticeLine(name, data))
		},
		OnReconnect: func(err error, wait time.Duration) {
			fmt.Fprintf(stderr, "agentstream: reconnecting in %s: %v\n", wait.Round(time.Millisecond), err)
		},
	})
	switch {
	case err == nil, errors.Is(err, transport.ErrEnded), errors.Is(err, context.Canceled):
		return nil
	}
	return err
}

// waitingLine is what tail says before following an agent (or a town)
// that has no events yet, so that a quiet terminal is not taken for a
// hang; "" when it has some, or when the server cannot say.
func waitingLine(ctx context.Context, srv, token, town, agent string) string {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(srv, "/")+"/api/towns/"+url.PathEscape(town)+"/agents", nil)
	if err != nil {
		return ""
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return "" // the stream's own reconnects say what is wrong
	}
	defer resp.Body.Close()
	var list struct {
		Agents []struct {
			AgentID string `json:"agent_id"`
		} `json:"agents"`
	}
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&list) != nil {
		return ""
	}
	if agent == "" {
		if len(list.Agents) == 0 {
			return fmt.Sprintf("agentstream: town %s has no events yet; waiting for the first", town)
		}
		return ""
	}
	for _, a := range list.Agents {
		if a.AgentID == agent {
			return ""
		}
	}
	return fmt.Sprintf("agentstream: %s of town %s has no events yet; waiting for its first", agent, town)
}

// noticeLine is what tail prints for a stream notice: a gap is a warning
// that says which events are gone and where the stream goes on.
func noticeLine(name string, data []byte) string {
	var gap struct {
		Agent   string `json:"agent"`
		After   int64  `json:"after"`
		FirstID int64  `json:"first_id"`
	}
	if name == "gap" && json.Unmarshal(data, &gap) == nil {
		if gap.Agent != "" {
			return fmt.Sprintf("agentstream: warning: events of %s after id %d were deleted by retention before they were read; its events go on from id %d", gap.Agent, gap.After, gap.FirstID)
		}
		return fmt.Sprintf("agentstream: warning: events after id %d were deleted by retention before they were read; going on from id %d", gap.After, gap.FirstID)
	}
	return fmt.Sprintf("agentstream: notice %s %s", name, data)
}

// exitStatus is an exit status passed through from a command `run` wrapped.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// poster is what run and emit share: whom they post as, and where.
type poster struct {
	rig, agent, server, token, town, data *string
}

func posterFlags(fs *flag.FlagSet) *poster {
	return &poster{
		rig:    fs.String("rig", "", "rig of the agent"),
		agent:  fs.String("agent", "", "agent id to post as"),
		server: fs.String("server", "http://127.0.0.1:8080", "server base URL"),
		token:  fs.String("token", "", "agent token (default: minted for --town, --rig and --agent from the secret in --data)"),
		town:   fs.String("town", "", "town of the agent, to mint a token when no --token is given"),
		data:   fs.String("data", "./agentstream-data", "data directory holding the server's secret, when no --token is given"),
	}
}

// sink checks the flags and returns the ingest client to post with.
func (p *poster) sink(cmd string, stderr io.Writer) (*server.IngestClient, error) {
	if *p.rig == "" || *p.agent == "" {
		return nil, usageError{cmd + " needs --rig and --agent"}
	}
	token := *p.token
	if token == "" {
		if *p.town == "" {
			return nil, usageError{cmd + " needs --token, or --town to mint one from the secret in --data"}
		}
		auth, err := loadAuth(*p.data)
		if err != nil {
			return nil, fmt.Errorf("no --token, and no secret to mint one: %w", err)
		}
		if token, err = auth.MintAgent(*p.town, *p.rig, *p.agent, 24*time.Hour); err != nil {
			return nil, err
		}
	}
	return &server.IngestClient{URL: *p.server, Token: token, Rig: *p.rig,
		OnRetry: func(err error, wait time.Duration) {
			fmt.Fprintf(stderr, "agentstream: posting events failed, retrying in %s: %v\n", wait.Round(time.Millisecond), err)
		}}, nil
}

func cmdRun(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("run", "run --rig R --agent A [--token T | --town T] [flags] -- COMMAND [ARG...]", stderr)
	p := posterFlags(fs)
	command, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	sink, err := p.sink("run", stderr)
	if err != nil {
		return err
	}
	if len(command) == 0 {
		return usageError{"run needs a command after --"}
	}
	in := catchInterrupts()
	defer in.release()
	sink.Stop = in.stop
	exit, err := container.Run(context.Background(), container.RunOptions{
		Command: command, Sink: sink, MaxData: server.MaxDataBytes, MaxBatch: server.MaxBatch,
		Stdin: os.Stdin, Stdout: stdout, Stderr: stderr, Signals: in.forward,
	})
	if errors.Is(err, container.ErrBadRequest) {
		return usageError{err.Error()}
	}
	if in.interrupted() {
		return in.result(*p.agent, err)
	}
	if err != nil {
		return fmt.Errorf("events of %s not all delivered: %w", *p.agent, err)
	}
	if exit.ExitCode != 0 {
		return exitStatus(max(1, min(exit.ExitCode, 255)))
	}
	return nil
}

// cmdEmit posts the lines of stdin as events, by the container's line rules.
func cmdEmit(args []string, stdin io.Reader, stderr io.Writer) error {
	fs := newFlags("emit", "emit --rig R --agent A [--token T | --town T] [flags] < LINES", stderr)
	p := posterFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	sink, err := p.sink("emit", stderr)
	if err != nil {
		return err
	}
	in := catchInterrupts()
	defer in.release()
	sink.Stop = in.stop
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-in.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	err = container.Emit(ctx, stdin, container.RunOptions{Sink: sink, MaxData: server.MaxDataBytes, MaxBatch: server.MaxBatch})
	if in.interrupted() {
		return in.result(*p.agent, err)
	}
	if err != nil {
		return fmt.Errorf("events of %s not all delivered: %w", *p.agent, err)
	}
	return nil
}

// interrupt is Ctrl-C (SIGINT) or SIGTERM for run and emit: the first one
// closes stop, which ends the ingest client's retries at once, and is
// handed on through forward, for run to pass to its command.
type interrupt struct {
	sigs    chan os.Signal
	stop    chan struct{}
	forward chan os.Signal
	sig     os.Signal // the signal; set before stop is closed
}

func catchInterrupts() *interrupt {
	in := &interrupt{sigs: make(chan os.Signal, 1), stop: make(chan struct{}), forward: make(chan os.Signal, 1)}
	signal.Notify(in.sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s, ok := <-in.sigs
		if !ok {
			return
		}
		in.sig = s
		close(in.stop)
		in.forward <- s
	}()
	return in
}

// release stops catching signals.
func (in *interrupt) release() {
	signal.Stop(in.sigs)
	close(in.sigs)
}

func (in *interrupt) interrupted() bool {
	select {
	case <-in.stop:
		return true
	default:
		return false
	}
}

// result is how an interrupted run or emit ends: status 128 + the signal
// (130 for Ctrl-C), saying how many events were not delivered, if any.
func (in *interrupt) result(agent string, err error) error {
	code := 130
	if s, ok := in.sig.(syscall.Signal); ok {
		code = 128 + int(s)
	}
	var ue *container.UndeliveredError
	switch {
	case errors.As(err, &ue):
		n := fmt.Sprintf("%d events", ue.N)
		if ue.N == 1 {
			n = "1 event"
		}
		return statusError{code, fmt.Sprintf("interrupted: %s of %s not delivered; the last attempt: %v", n, agent, ue.Err)}
	case err != nil && !errors.Is(err, context.Canceled):
		return statusError{code, fmt.Sprintf("interrupted: %v", err)}
	}
	return statusError{code, "interrupted; every event read was delivered"}
}

// statusError ends the process with its status, after printing its message.
type statusError struct {
	code int
	msg  string
}

func (e statusError) Error() string { return e.msg }
