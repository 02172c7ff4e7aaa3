// Package container is agentstream's container mode: a control API that
// runs agent processes, turns their output into events by the line rules
// (see ParseLine), and keeps each agent's recent events in a ring buffer
// that a relay (`agentstream serve --upstream`) polls and persists.
//
// The ring is the only copy a container holds: it is bounded (500 events
// per agent by default) so that a chatty agent costs a fixed amount of
// memory, and a relay that falls further behind than that is told so by the
// first sequence number still held, rather than missing events silently.
package container

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/agentstream/agentstream/model"
)

// SecretEnv is the variable holding the control API's bearer secret. It is
// never passed on to agent processes.
const SecretEnv = "AGENTSTREAM_CONTAINER_SECRET"

// Agent states.
const (
	StateRunning = "running"
	StateExited  = "exited"
)

// MinSecretLen is the shortest control API secret accepted: as long as
// the server's signing secret, so neither is the weaker one to guess.
const MinSecretLen = 32

// minimalEnv is what agents keep of the container's environment with
// AgentEnv's minimal: what a program needs to find its tools, its home and
// its locale, and nothing that could carry a secret.
var minimalEnv = []string{"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TZ", "TMPDIR", "TERM"}

// AgentEnv is the environment agent processes start from, made from the
// container's own environ. Every AGENTSTREAM_ variable is dropped: the
// container's secret, and the server's signing secret if it is set here,
// would let an agent start processes or mint tokens for every town. With
// minimal, only a few harmless variables (PATH, HOME, LANG, ...) are kept,
// and those named in allow.
func AgentEnv(environ []string, minimal bool, allow []string) []string {
	keep := func(name string) bool {
		if strings.HasPrefix(name, "AGENTSTREAM_") {
			return false
		}
		return !minimal || slices.Contains(minimalEnv, name) || slices.Contains(allow, name)
	}
	var env []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if keep(name) {
			env = append(env, kv)
		}
	}
	return env
}

// Exit reasons, in the data of the agent.exited event.
const (
	ReasonCompleted = "completed" // exit status 0
	ReasonFailed    = "failed"    // non-zero status, or ended by a signal
	ReasonStopped   = "stopped"   // ended after DELETE, however it exited
)

// Options tune a Container; zero values are the defaults.
type Options struct {
	Grace   time.Duration // from SIGTERM to SIGKILL on stop; default 10 s
	TTL     time.Duration // how long an exited agent's buffer is kept; default 5 min
	RingLen int           // events kept per agent; default 500
	// Env is the environment agent processes start from (a request's env
	// is added to it); default AgentEnv(os.Environ(), false, nil): the
	// container's own, without any AGENTSTREAM_ variable.
	Env []string
	// Drain bounds the wait, after a process exits, for the rest of its
	// output: children it left behind may hold its pipes. Default 2 s.
	Drain time.Duration
	Now   func() time.Time // the clock; default time.Now
	Log   *slog.Logger
}

// Container runs agent processes and holds their recent events.
type Container struct {
	opts Options
	wg   sync.WaitGroup // process supervisors
	stop chan struct{}  // closed by Close: the sweeper ends

	mu     sync.Mutex
	agents map[string]*agent
	closed bool
}

// Event is one event of an agent as the container holds it: the line rules'
// type and data, a sequence number that only grows within a run, and when
// the line was read.
type Event struct {
	Seq  int64           `json:"seq"`
	Type string          `json:"type"`
	Data json.RawMessage `json:"data"`
	Time time.Time       `json:"time"`
}

// StartRequest is the body of POST /agents.
type StartRequest struct {
	AgentID string            `json:"agent_id"`
	Command []string          `json:"command"`
	Env     map[string]string `json:"env,omitempty"`
	Dir     string            `json:"dir,omitempty"`
}

// AgentInfo is an agent as GET /agents lists it.
type AgentInfo struct {
	AgentID string `json:"agent_id"`
	// Run names this start of the agent; a later start of the same id is
	// another run, whose sequence numbers begin again at 1.
	Run       string     `json:"run"`
	State     string     `json:"state"`
	PID       int        `json:"pid"`
	StartedAt time.Time  `json:"started_at"`
	ExitedAt  *time.Time `json:"exited_at,omitempty"`
	Reason    string     `json:"reason,omitempty"`
	ExitCode  *int       `json:"exit_code,omitempty"`
	LastSeq   int64      `json:"last_seq"`
}

// Page is the answer to GET /agents/{id}/events: events after a cursor,
// oldest first. FirstSeq is the oldest sequence number the ring still holds
// (0 when it holds none): a cursor below FirstSeq-1 has missed events.
type Page struct {
	AgentID  string  `json:"agent_id"`
	Run      string  `json:"run,omitempty"`
	State    string  `json:"state,omitempty"`
	FirstSeq int64   `json:"first_seq"`
	LastSeq  int64   `json:"last_seq"`
	Events   []Event `json:"events"`
}

// ExitData is the data of the agent.exited event the container adds.
type ExitData struct {
	Reason   string `json:"reason"`
	ExitCode int    `json:"exit_code"`
	Signal   string `json:"signal,omitempty"`
}

// Errors of Start and Stop; the HTTP API maps them to statuses.
var (
	ErrRunning    = errors.New("agent is running")
	ErrNotFound   = errors.New("no such agent")
	ErrClosed     = errors.New("container is shutting down")
	ErrBadRequest = errors.New("bad request")
)

type agent struct {
	id, run   string
	pid       int
	startedAt time.Time
	done      chan struct{} // closed once agent.exited is in the ring

	mu       sync.Mutex
	ring     ring
	seq      int64
	stopping bool
	exited   bool
	exitedAt time.Time
	exit     ExitData
}

// New returns a Container. Close it to stop its agents.
func New(opts Options) *Container {
	if opts.Grace <= 0 {
		opts.Grace = 10 * time.Second
	}
	if opts.TTL <= 0 {
		opts.TTL = 5 * time.Minute
	}
	if opts.RingLen <= 0 {
		opts.RingLen = 500
	}
	if opts.Env == nil {
		opts.Env = AgentEnv(os.Environ(), false, nil)
	}
	if opts.Drain <= 0 {
		opts.Drain = 2 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	c := &Container{opts: opts, agents: map[string]*agent{}, stop: make(chan struct{})}
	c.wg.Go(c.sweepLoop)
	return c
}

// Start starts an agent process in its own process group, with stdin from
// /dev/null and stdout and stderr read by the line rules. It fails with
// ErrRunning if the id is running, and with an error wrapping
// ErrBadRequest, starting nothing, if the request is invalid or the command
// cannot be started. A start of an exited id replaces its buffer.
func (c *Container) Start(req StartRequest) (AgentInfo, error) {
	if err := req.check(); err != nil {
		return AgentInfo{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sweepLocked()
	if c.closed {
		return AgentInfo{}, ErrClosed
	}
	if old := c.agents[req.AgentID]; old != nil && old.running() {
		return AgentInfo{}, ErrRunning
	}
	var raw [8]byte
	rand.Read(raw[:])
	a := &agent{id: req.AgentID, run: hex.EncodeToString(raw[:]), done: make(chan struct{}), ring: newRing(c.opts.RingLen)}

	env := append([]string(nil), c.opts.Env...)
	keys := make([]string, 0, len(req.Env))
	for k := range req.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+req.Env[k])
	}
	env = append(env, "AGENTSTREAM_AGENT_ID="+a.id, "AGENTSTREAM_RUN="+a.run)
	p, err := startProc(req.Command, req.Dir, env, nil, nil, nil)
	if err != nil {
		return AgentInfo{}, err
	}
	a.pid = p.pid()
	a.startedAt = c.opts.Now()
	c.agents[a.id] = a
	c.opts.Log.Info("agent started", "agent", a.id, "run", a.run, "pid", a.pid, "command", req.Command[0])
	c.wg.Go(func() { c.supervise(a, p) })
	return a.info(), nil
}

func (r *StartRequest) check() error {
	if msg := checkID(r.AgentID); msg != "" {
		return fmt.Errorf("%w: %s", ErrBadRequest, msg)
	}
	if len(r.Command) == 0 || r.Command[0] == "" {
		return fmt.Errorf("%w: command is empty; give the program and its arguments as a list of strings", ErrBadRequest)
	}
	for k, v := range r.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return fmt.Errorf("%w: env %q is not a valid variable name and value", ErrBadRequest, k)
		}
		if k == SecretEnv {
			return fmt.Errorf("%w: env may not set %s", ErrBadRequest, SecretEnv)
		}
	}
	if r.Dir != "" {
		if st, err := os.Stat(r.Dir); err != nil || !st.IsDir() {
			return fmt.Errorf("%w: dir %q is not a directory here", ErrBadRequest, r.Dir)
		}
	}
	return nil
}

// checkID returns why id is not a valid agent id, or "": 1 to 128 of
// A-Z, a-z, 0-9, '.', '_', ':' and '-', so that it is safe in a URL path.
func checkID(id string) string {
	if id == "" || len(id) > 128 {
		return "agent_id must be 1 to 128 characters"
	}
	for _, c := range []byte(id) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return fmt.Sprintf("agent_id %q has a character outside A-Z, a-z, 0-9, '.', '_', ':' and '-'", id)
		}
	}
	return ""
}

// supervise reads the process's output until it exits and its pipes are
// drained, then adds agent.exited.
func (c *Container) supervise(a *agent, p *proc) {
	stopped := func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.stopping
	}
	exit, err := p.wait(c.opts.Drain, stopped, func(l Line) { a.add(c.opts.Now(), l.Type, l.Data) })
	if err != nil {
		c.opts.Log.Warn("agent output", "agent", a.id, "err", err)
	}
	data, _ := json.Marshal(exit)
	now := c.opts.Now()
	a.mu.Lock()
	a.addLocked(now, model.TypeExited, data)
	a.exited, a.exitedAt, a.exit = true, now, exit
	a.mu.Unlock()
	close(a.done)
	c.opts.Log.Info("agent exited", "agent", a.id, "run", a.run, "reason", exit.Reason, "exit_code", exit.ExitCode)
}

// Stop ends a running agent: SIGTERM to its process group, then SIGKILL to
// the group if it has not exited after the grace period. It returns at once;
// the agent's agent.exited event says when it has ended. Stopping an exited
// agent does nothing.
func (c *Container) Stop(id string) (AgentInfo, error) {
	c.mu.Lock()
	c.sweepLocked()
	a := c.agents[id]
	c.mu.Unlock()
	if a == nil {
		return AgentInfo{}, ErrNotFound
	}
	a.mu.Lock()
	first := !a.stopping && !a.exited
	if first {
		a.stopping = true
	}
	a.mu.Unlock()
	// The answer is the agent as the stop found it: a process that dies
	// the instant it hears SIGTERM would otherwise read as "had exited".
	info := a.info()
	if first {
		c.terminate(a)
	}
	return info, nil
}

func (c *Container) terminate(a *agent) {
	signalGroup(a.pid, syscall.SIGTERM)
	c.wg.Go(func() {
		t := time.NewTimer(c.opts.Grace)
		defer t.Stop()
		select {
		case <-a.done:
		case <-t.C:
			c.opts.Log.Warn("agent ignored SIGTERM; killing its process group", "agent", a.id, "grace", c.opts.Grace)
			signalGroup(a.pid, syscall.SIGKILL)
		}
	})
}

// Agents lists the agents held, running or exited, by id.
func (c *Container) Agents() []AgentInfo {
	c.mu.Lock()
	c.sweepLocked()
	list := make([]*agent, 0, len(c.agents))
	for _, a := range c.agents {
		list = append(list, a)
	}
	c.mu.Unlock()
	out := make([]AgentInfo, len(list))
	for i, a := range list {
		out[i] = a.info()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].AgentID < out[j].AgentID })
	return out
}

// Events returns up to limit events of agent id with seq > after, from its
// ring. An unknown agent has an empty page.
func (c *Container) Events(id string, after int64, limit int) Page {
	c.mu.Lock()
	c.sweepLocked()
	a := c.agents[id]
	c.mu.Unlock()
	p := Page{AgentID: id, Events: []Event{}}
	if a == nil {
		return p
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	p.Run, p.State, p.LastSeq = a.run, a.state(), a.seq
	p.FirstSeq = a.ring.first()
	p.Events = a.ring.after(p.Events, after, limit)
	return p
}

// Close stops every running agent (SIGTERM, then SIGKILL after the grace
// period or when ctx ends) and waits for them. Start fails after Close.
func (c *Container) Close(ctx context.Context) error {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.stop)
	}
	var running []*agent
	for _, a := range c.agents {
		running = append(running, a)
	}
	c.mu.Unlock()
	for _, a := range running {
		c.Stop(a.id)
	}
	done := make(chan struct{})
	go func() { c.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		for _, a := range running {
			signalGroup(a.pid, syscall.SIGKILL)
		}
		<-done
		return ctx.Err()
	}
}

// sweepLoop drops expired buffers even when nobody asks for anything.
func (c *Container) sweepLoop() {
	t := time.NewTicker(min(c.opts.TTL/4, time.Minute))
	defer t.Stop()
	for {
		select {
		case <-t.C:
			c.mu.Lock()
			c.sweepLocked()
			c.mu.Unlock()
		case <-c.stop:
			return
		}
	}
}

// sweepLocked drops the agents that exited more than TTL ago. Every API
// call sweeps first, so what the clock says holds at once.
func (c *Container) sweepLocked() {
	now := c.opts.Now()
	for id, a := range c.agents {
		a.mu.Lock()
		expired := a.exited && now.Sub(a.exitedAt) >= c.opts.TTL
		a.mu.Unlock()
		if expired {
			delete(c.agents, id)
		}
	}
}

func (a *agent) running() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return !a.exited
}

func (a *agent) state() string {
	if a.exited {
		return StateExited
	}
	return StateRunning
}

func (a *agent) add(now time.Time, typ string, data json.RawMessage) {
	a.mu.Lock()
	a.addLocked(now, typ, data)
	a.mu.Unlock()
}

func (a *agent) addLocked(now time.Time, typ string, data json.RawMessage) {
	a.seq++
	a.ring.push(Event{Seq: a.seq, Type: typ, Data: data, Time: now})
}

func (a *agent) info() AgentInfo {
	a.mu.Lock()
	defer a.mu.Unlock()
	in := AgentInfo{AgentID: a.id, Run: a.run, State: a.state(), PID: a.pid, StartedAt: a.startedAt, LastSeq: a.seq}
	if a.exited {
		at, code := a.exitedAt, a.exit.ExitCode
		in.ExitedAt, in.Reason, in.ExitCode = &at, a.exit.Reason, &code
	}
	return in
}

// ring holds an agent's newest events, oldest first.
type ring struct {
	buf   []Event
	start int
	n     int
}

func newRing(size int) ring { return ring{buf: make([]Event, size)} }

func (r *ring) at(i int) *Event { return &r.buf[(r.start+i)%len(r.buf)] }

func (r *ring) push(e Event) {
	if r.n == len(r.buf) {
		r.buf[r.start] = Event{}
		r.start = (r.start + 1) % len(r.buf)
		r.n--
	}
	r.buf[(r.start+r.n)%len(r.buf)] = e
	r.n++
}

// first is the oldest sequence number held, or 0.
func (r *ring) first() int64 {
	if r.n == 0 {
		return 0
	}
	return r.at(0).Seq
}

// after appends up to limit events with seq > cursor; sequence numbers are
// consecutive, so the first one is found by arithmetic.
func (r *ring) after(dst []Event, cursor int64, limit int) []Event {
	if r.n == 0 {
		return dst
	}
	i := int(max(0, cursor-r.at(0).Seq+1))
	for ; i < r.n && len(dst) < limit; i++ {
		dst = append(dst, *r.at(i))
	}
	return dst
}
