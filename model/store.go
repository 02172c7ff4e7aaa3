package model

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/uptrace/bun"
)

// DefaultRetain is how many events per agent the store keeps by default.
const DefaultRetain = 2000

// maxGroup bounds the events one group commit writes, so one transaction
// stays short and its SQL text stays small.
const maxGroup = 4096

// ErrClosed is returned by Append after Close.
var ErrClosed = errors.New("store closed")

// Options tunes a Store. The zero value is the production default.
type Options struct {
	// Retain is how many of the newest events per agent are kept; older ones
	// are pruned in the background. 0 means DefaultRetain; negative keeps all.
	Retain int
	// PruneEvery is the least time between two pruning passes (default 1 s).
	PruneEvery time.Duration
	// NoGroupCommit gives every Append its own transaction. It exists to
	// measure what group commit buys; nothing else should set it.
	NoGroupCommit bool
	// Logger receives background errors (pruning). Default: slog.Default().
	Logger *slog.Logger
}

// Store is agent_events behind a bun DB.
//
// Writes go through one writer goroutine: concurrent Appends queue on a
// channel and the writer commits everything queued in one transaction (group
// commit), so the cost of a commit — an fsync — is shared by all of them and
// throughput grows with load. SQLite takes one writer at a time anyway; a
// single writer also means no SQLITE_BUSY between our own writes.
type Store struct {
	db      *bun.DB
	dialect dialect
	opts    Options
	log     *slog.Logger

	onCommit atomic.Pointer[func(Commit)]
	// writeErr is the error of the last commit, or of the last write
	// probe, whichever came last; nil after a success.
	writeErr atomic.Pointer[error]

	mu      sync.RWMutex // guards closed against sends on appendc
	closed  bool
	appendc chan *appendReq
	wdone   chan struct{}

	// rigs caches agents' rig bindings; only the writer goroutine uses it.
	rigs map[townAgent]string

	pruneMu sync.Mutex // one pruning pass at a time
	dirtyMu sync.Mutex
	dirty   map[townAgent]struct{} // agents appended to since the last prune
	prunec  chan struct{}          // wakes the pruner; capacity 1
	pstop   chan struct{}
	pdone   chan struct{}
}

type appendReq struct {
	events []Event
	done   chan error // capacity 1: the writer never blocks on it
	err    error      // set by the writer when this request alone is refused

	once     *Once      // AppendOnce's key, or nil
	replayed bool       // its key was stored: events got the stored ids
	leader   *appendReq // an earlier request of the group with the same key

	// caller and kept are set when the commit skipped relayed events that
	// were stored already: events then holds the others, copied, kept[j]
	// is the index in caller (the caller's slice) of events[j].
	caller []Event
	kept   []int
}

// stored reports whether the commit wrote this request's events.
func (r *appendReq) stored() bool { return r.err == nil && !r.replayed && r.leader == nil }

// townAgent is an agent's identity: its town and its id.
type townAgent struct{ town, agent string }

// maxRigCache bounds the writer's cache of rig bindings; past it the cache
// starts over (it is only a cache: the agents table is the truth).
const maxRigCache = 100_000

// Open opens (creating it if needed) the database named by dsn and brings its
// schema up to date. dsn is "sqlite:PATH" or a bare PATH (the embedded
// default, sqlite.go), or a "postgres://" URL (for several instances on one
// database, postgres.go). What differs between the two is in those files.
func Open(ctx context.Context, dsn string, opts Options) (*Store, error) {
	var (
		db  *bun.DB
		d   dialect
		err error
	)
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		db, d, err = openPostgres(ctx, dsn)
	case strings.Contains(dsn, "://"):
		return nil, fmt.Errorf("open %q: the database must be sqlite:PATH or postgres://...", redact(dsn))
	default:
		db, d, err = openSQLite(ctx, strings.TrimPrefix(dsn, "sqlite:"))
	}
	if err != nil {
		return nil, err
	}
	unlock, err := d.lockMigrations(ctx, db)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open: %w", err)
	}
	err = runMigrations(ctx, db)
	unlock()
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open: %w", err)
	}
	s := newStore(db, opts)
	s.dialect = d
	return s, nil
}

// dialect is what the store does differently on each database.
type dialect interface {
	// lockMigrations keeps other processes from migrating the same
	// database at once (instances started together) until unlock.
	lockMigrations(ctx context.Context, db *bun.DB) (unlock func(), err error)
	// lockTowns is called in a group commit's transaction before any id
	// is drawn. It makes the towns' ids commit in id order: a reader of
	// "id > cursor" must never see an id before a smaller one of the same
	// town commits.
	lockTowns(ctx context.Context, tx bun.Tx, towns []string) error
	// notify tells other instances, at the commit of tx, which agents got
	// events: one notification for the whole group.
	notify(ctx context.Context, tx bun.Tx, agents []AgentKey) error
	// listen calls fn with the agents other instances' commits name, until
	// ctx ends; fn(nil) means "any agent": notifications may have been
	// missed. It returns ErrNoListen where the database has no such thing.
	listen(ctx context.Context, log *slog.Logger, fn func([]AgentKey)) error
}

// ErrNoListen is Listen's error on a database that needs none: SQLite has
// one writer process, whose own commits reach its feeds directly.
var ErrNoListen = errors.New("this database has no LISTEN: other writers are seen by polling")

// Listen hears other instances' commits on a shared database and calls fn
// with the agents they wrote to (fn(nil): any agent), until ctx ends. The
// connection it listens on is re-established, with backoff, after it
// drops; meanwhile feeds still poll. On SQLite it returns ErrNoListen.
func (s *Store) Listen(ctx context.Context, fn func([]AgentKey)) error {
	return s.dialect.listen(ctx, s.log, fn)
}

func newStore(db *bun.DB, opts Options) *Store {
	if opts.Retain == 0 {
		opts.Retain = DefaultRetain
	}
	if opts.PruneEvery <= 0 {
		opts.PruneEvery = time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Store{
		db:      db,
		opts:    opts,
		log:     log,
		appendc: make(chan *appendReq, 1024),
		wdone:   make(chan struct{}),
		dirty:   make(map[townAgent]struct{}),
		rigs:    make(map[townAgent]string),
		prunec:  make(chan struct{}, 1),
		pstop:   make(chan struct{}),
		pdone:   make(chan struct{}),
	}
	go s.writeLoop()
	go s.pruneLoop()
	return s
}

// DB is the underlying bun DB, for other models (and tests) sharing the file.
func (s *Store) DB() *bun.DB { return s.db }

// Ping reports whether the database answers.
func (s *Store) Ping(ctx context.Context) error {
	var one int
	return s.db.NewRaw("SELECT 1").Scan(ctx, &one)
}

// Append commits events in one transaction, in order, and sets their ID (and
// CreatedAt, when zero). When it returns nil the events are durable. Appends
// from many goroutines are committed together; each caller's events stay
// contiguous and in the order given.
//
// An agent's first event binds it to that event's rig. Events of an agent
// that is bound to another rig are refused with a *RigConflictError, and
// none of that call's events are stored.
//
// A relayed event (UpstreamRun set) whose sequence number is already
// stored for its run is skipped and keeps ID 0: relays on several
// instances pulling one container store each event once, whichever
// commits first.
//
// If ctx ends first Append returns its error, but events already queued may
// still be committed.
func (s *Store) Append(ctx context.Context, events []Event) error {
	if len(events) == 0 {
		return nil
	}
	return s.enqueue(ctx, &appendReq{events: events})
}

// enqueue hands r to the writer and waits for its answer.
func (s *Store) enqueue(ctx context.Context, r *appendReq) error {
	// The database keeps microseconds; cut them here so that what Append
	// hands back equals what After reads.
	now := time.Now().UTC().Truncate(time.Microsecond)
	for i := range r.events {
		if r.events[i].CreatedAt.IsZero() {
			r.events[i].CreatedAt = now
		} else {
			r.events[i].CreatedAt = r.events[i].CreatedAt.UTC().Truncate(time.Microsecond)
		}
	}
	r.done = make(chan error, 1)
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return ErrClosed
	}
	select {
	case s.appendc <- r:
		s.mu.RUnlock()
	case <-ctx.Done():
		s.mu.RUnlock()
		return ctx.Err()
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Store) writeLoop() {
	defer close(s.wdone)
	var group []*appendReq
	for r := range s.appendc {
		group = append(group[:0], r)
		n := len(r.events)
	drain:
		for !s.opts.NoGroupCommit && n < maxGroup {
			select {
			case r, ok := <-s.appendc:
				if !ok {
					break drain
				}
				group = append(group, r)
				n += len(r.events)
			default:
				break drain
			}
		}
		bound, prev, err := s.commit(group)
		s.wrote(err)
		if err == nil {
			for k, rig := range bound {
				if len(s.rigs) >= maxRigCache {
					clear(s.rigs)
				}
				s.rigs[k] = rig
			}
			s.markDirty(group)
			if fn := s.onCommit.Load(); fn != nil {
				c := Commit{Prev: prev}
				for _, r := range group {
					if r.stored() {
						// A copy: the callers own their slices again once answered.
						c.Events = append(c.Events, r.events...)
					}
				}
				if len(c.Events) > 0 {
					(*fn)(c)
				}
			}
		}
		for _, r := range group {
			if err != nil {
				r.done <- err
			} else {
				r.done <- r.err
			}
		}
		clear(group) // drop references to the callers' slices
	}
}

// commit writes a group in one transaction, and returns the rig bindings it
// read or made, and each town's highest id before it (Commit.Prev). A
// request with an event of an agent bound to another rig is left out, with
// its err set. commit does not take a caller's context: one caller giving
// up must not abort the others' events.
func (s *Store) commit(group []*appendReq) (map[townAgent]string, map[string]int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var bound map[townAgent]string
	var prev map[string]int64
	err := s.db.RunInTx(ctx, nil, func(ctx context.Context, tx bun.Tx) error {
		for _, r := range group {
			r.err, r.replayed, r.leader = nil, false, nil
			if r.caller != nil {
				r.events, r.caller, r.kept = r.caller, nil, nil
			}
		}
		towns := groupTowns(group)
		if err := s.dialect.lockTowns(ctx, tx, towns); err != nil {
			return err
		}
		// Under the locks, so the town's ids below ours are all committed.
		prev = make(map[string]int64, len(towns))
		for _, t := range towns {
			var id sql.NullInt64
			if err := tx.NewSelect().Model((*Event)(nil)).ColumnExpr("MAX(id)").Where("town_id = ?", t).Scan(ctx, &id); err != nil {
				return fmt.Errorf("latest event of town %s: %w", t, err)
			}
			prev[t] = id.Int64
		}
		// After the town locks: no other instance commits to these towns
		// until this transaction ends, so what is stored cannot change
		// under the check.
		if err := skipRelayed(ctx, tx, group); err != nil {
			return err
		}
		if err := checkKeys(ctx, tx, group); err != nil {
			return err
		}
		var err error
		if bound, err = s.bindRigs(ctx, tx, group); err != nil {
			return err
		}
		for _, r := range group {
			if !r.stored() {
				continue
			}
			for evs := range slices.Chunk(r.events, 500) {
				if err := insertEvents(ctx, tx, evs); err != nil {
					return err
				}
			}
			if r.caller != nil {
				for i := range r.caller {
					r.caller[i].ID = 0
				}
				for j, i := range r.kept {
					r.caller[i].ID = r.events[j].ID
				}
			}
			if r.once != nil {
				if err := storeKey(ctx, tx, r); err != nil {
					return err
				}
			}
		}
		if err := s.dialect.notify(ctx, tx, groupAgents(group)); err != nil {
			return err
		}
		// A request that repeated an earlier one's key in this group gets
		// that one's ids, or its refusal.
		for _, r := range group {
			if l := r.leader; l != nil {
				r.err = l.err
				for i := range r.events {
					r.events[i].ID = l.events[i].ID
				}
				r.replayed = l.err == nil
				r.leader = nil
			}
		}
		return nil
	})
	return bound, prev, err
}

// skipRelayed leaves out of the group's requests the relayed events that
// are stored already: by a relay on another instance pulling the same
// container, or by this one before it restarted. A clash in the unique
// index would otherwise fail the whole group, other callers' events too.
// A relay stores a run's events in sequence order, and a gap as an event
// of its own at the last lost number, so every number up to a run's
// highest stored one is taken. Groups without relayed events cost nothing.
func skipRelayed(ctx context.Context, tx bun.Tx, group []*appendReq) error {
	type runKey struct{ town, agent, run string }
	var high map[runKey]int64
	for _, r := range group {
		if !r.stored() || !slices.ContainsFunc(r.events, func(e Event) bool { return e.UpstreamRun != "" }) {
			continue
		}
		if high == nil {
			high = make(map[runKey]int64)
		}
		var kept []int
		for i, e := range r.events {
			if e.UpstreamRun != "" {
				k := runKey{e.TownID, e.AgentID, e.UpstreamRun}
				h, ok := high[k]
				if !ok {
					var seq sql.NullInt64
					err := tx.NewSelect().Model((*Event)(nil)).ColumnExpr("MAX(upstream_seq)").
						Where("town_id = ?", k.town).Where("agent_id = ?", k.agent).Where("upstream_run = ?", k.run).
						Scan(ctx, &seq)
					if err != nil {
						return fmt.Errorf("upstream cursor of %s: %w", k.agent, err)
					}
					h = seq.Int64
				}
				if e.UpstreamSeq <= h {
					high[k] = h
					continue
				}
				high[k] = e.UpstreamSeq
			}
			kept = append(kept, i)
		}
		if len(kept) == len(r.events) {
			continue
		}
		evs := make([]Event, len(kept))
		for j, i := range kept {
			evs[j] = r.events[i]
		}
		r.caller, r.kept, r.events = r.events, kept, evs
	}
	return nil
}

// groupAgents lists the agents a group stores events for.
func groupAgents(group []*appendReq) []AgentKey {
	var keys []AgentKey
	for _, r := range group {
		if !r.stored() {
			continue
		}
		for i := range r.events {
			k := AgentKey{Town: r.events[i].TownID, Agent: r.events[i].AgentID}
			if !slices.Contains(keys, k) {
				keys = append(keys, k)
			}
		}
	}
	return keys
}

// groupTowns lists the towns of a group's events, sorted: locks taken in
// one order by every writer cannot deadlock.
func groupTowns(group []*appendReq) []string {
	var towns []string
	for _, r := range group {
		for i := range r.events {
			if t := r.events[i].TownID; !slices.Contains(towns, t) {
				towns = append(towns, t)
			}
		}
	}
	slices.Sort(towns)
	return towns
}

// bindRigs checks every event's rig against its agent's binding, in the
// transaction that will store the events, and binds agents seen for the
// first time to the rig of their first event. Requests that name another
// rig get a *RigConflictError in err.
//
// Bindings are read inside the write transaction (SQLite's write lock is
// held from BEGIN IMMEDIATE), so a binding another process made a moment
// ago is seen; a new one is inserted with ON CONFLICT DO NOTHING and read
// back, so that of two writers racing to bind an agent one wins and the
// other is refused.
func (s *Store) bindRigs(ctx context.Context, tx bun.Tx, group []*appendReq) (map[townAgent]string, error) {
	bound := make(map[townAgent]string)
	var fresh []Agent // agents this group binds first
	for _, r := range group {
		if !r.stored() {
			continue
		}
		for i := range r.events {
			e := &r.events[i]
			k := townAgent{e.TownID, e.AgentID}
			rig, ok := bound[k]
			if !ok {
				rig, ok = s.rigs[k]
			}
			if !ok {
				var err error
				if rig, err = boundRig(ctx, tx, k); err != nil {
					return nil, err
				}
				ok = rig != ""
			}
			if !ok {
				// First sight: this event's rig is the binding, unless
				// the database says otherwise below.
				rig = e.RigID
				fresh = append(fresh, Agent{TownID: k.town, AgentID: k.agent, RigID: rig, CreatedAt: e.CreatedAt})
			}
			bound[k] = rig
			if rig != e.RigID {
				r.err = &RigConflictError{Town: k.town, Agent: k.agent, Rig: rig, Posted: e.RigID}
				break
			}
		}
	}
	if len(fresh) == 0 {
		return bound, nil
	}
	if _, err := tx.NewInsert().Model(&fresh).On("CONFLICT DO NOTHING").Exec(ctx); err != nil {
		return nil, fmt.Errorf("bind agents: %w", err)
	}
	// Read back what won: another writer may have bound one first.
	raced := false
	for _, a := range fresh {
		k := townAgent{a.TownID, a.AgentID}
		rig, err := boundRig(ctx, tx, k)
		if err != nil {
			return nil, err
		}
		if rig != a.RigID {
			bound[k] = rig
			raced = true
		}
	}
	if raced {
		for _, r := range group {
			for i := range r.events {
				e := &r.events[i]
				if rig := bound[townAgent{e.TownID, e.AgentID}]; r.stored() && rig != e.RigID {
					r.err = &RigConflictError{Town: e.TownID, Agent: e.AgentID, Rig: rig, Posted: e.RigID}
				}
			}
		}
	}
	return bound, nil
}

// boundRig returns the rig k is bound to, or "" when it is not yet.
func boundRig(ctx context.Context, db bun.IDB, k townAgent) (string, error) {
	var rig string
	err := db.NewSelect().Model((*Agent)(nil)).Column("rig_id").
		Where("town_id = ?", k.town).Where("agent_id = ?", k.agent).Scan(ctx, &rig)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("rig of %s/%s: %w", k.town, k.agent, err)
	}
	return rig, nil
}

// Rig returns the rig an agent of a town is bound to, or "" if it has
// posted nothing yet.
func (s *Store) Rig(ctx context.Context, k AgentKey) (string, error) {
	return boundRig(ctx, s.db, townAgent{k.Town, k.Agent})
}

func insertEvents(ctx context.Context, tx bun.Tx, evs []Event) error {
	for i := range evs {
		evs[i].ID = 0
	}
	if _, err := tx.NewInsert().Model(&evs).Returning("id").Exec(ctx); err != nil {
		return fmt.Errorf("append: %w", err)
	}
	// One INSERT assigns ids in VALUES order; RETURNING's row order is not
	// promised, so put the ids back in ascending order to be sure.
	if !slices.IsSortedFunc(evs, func(a, b Event) int { return int(a.ID - b.ID) }) {
		ids := make([]int64, len(evs))
		for i := range evs {
			ids[i] = evs[i].ID
		}
		slices.Sort(ids)
		for i := range evs {
			evs[i].ID = ids[i]
		}
	}
	return nil
}

// wrote records the outcome of a write: what Writable reports.
func (s *Store) wrote(err error) {
	if err == nil {
		if s.writeErr.Load() != nil {
			s.writeErr.Store(nil)
		}
		return
	}
	s.writeErr.Store(&err)
}

// Writable returns the error of the last write, nil if it committed (or
// nothing was written yet). A full disk or a read-only filesystem shows
// here while the database still answers reads.
func (s *Store) Writable() error {
	if p := s.writeErr.Load(); p != nil {
		return *p
	}
	return nil
}

// storeProbe is the one-row table ProbeWrite writes.
type storeProbe struct {
	bun.BaseModel `bun:"table:store_probe"`

	ID int64     `bun:"id,pk"`
	At time.Time `bun:"at,notnull"`
}

// ProbeWrite commits a one-row write, durably like an append, and records
// its outcome for Writable: how a store that could not commit finds out it
// can again without waiting for a client's write.
func (s *Store) ProbeWrite(ctx context.Context) error {
	err := s.db.RunInTx(ctx, nil, func(ctx context.Context, tx bun.Tx) error {
		_, err := tx.NewInsert().Model(&storeProbe{ID: 1, At: time.Now().UTC()}).
			On("CONFLICT (id) DO UPDATE").Set("at = EXCLUDED.at").Exec(ctx)
		return err
	})
	if ctx.Err() != nil {
		return ctx.Err() // the caller gave up: that says nothing of the store
	}
	if err != nil {
		err = fmt.Errorf("write probe: %w", err)
	}
	s.wrote(err)
	return err
}

// Commit is what one group commit stored, as OnCommit's function gets it.
type Commit struct {
	// Events are the events stored, in id order. Their Data is the
	// appenders' own (Append keeps it; it must not change afterwards).
	Events []Event
	// Prev is, for each town written, its highest id before the commit
	// (0 for none). A town's ids are committed in order (under the town's
	// lock), so the town's events in Events are all its events above
	// Prev, up to the highest of them: a reader that has read the town
	// (or one agent of it) through Prev needs no read of its own to go on.
	Prev map[string]int64
}

// OnCommit sets fn to be called with every commit, right after it, from
// the writer goroutine and before the appenders are answered — so it must
// not block. It is how readers in this process learn of new events at once
// instead of waiting for their next poll, and get them without reading.
func (s *Store) OnCommit(fn func(Commit)) {
	s.onCommit.Store(&fn)
}

// whereKey limits q to the events of k: one agent, or a whole town when k
// has no agent, and one rig when k names it.
func whereKey(q *bun.SelectQuery, k AgentKey) *bun.SelectQuery {
	q = q.Where("town_id = ?", k.Town)
	if !k.IsTown() {
		q = q.Where("agent_id = ?", k.Agent)
	}
	if k.Rig != "" {
		q = q.Where("rig_id = ?", k.Rig)
	}
	return q
}

// Latest returns the newest id of an agent (or town), or 0 if it has no
// events.
func (s *Store) Latest(ctx context.Context, k AgentKey) (int64, error) {
	var id sql.NullInt64
	q := whereKey(s.db.NewSelect().Model((*Event)(nil)).ColumnExpr("MAX(id)"), k)
	if err := q.Scan(ctx, &id); err != nil {
		return 0, fmt.Errorf("latest event of %s: %w", k.Agent, err)
	}
	return id.Int64, nil
}

// Changed returns the agents of town with events whose ids are above
// afterID, each with its highest id. It is one range read of the
// (town_id, id) index, whatever the number of agents: what the poll
// scheduler asks each interval, for every town it follows, to learn of
// other writers' commits.
func (s *Store) Changed(ctx context.Context, town string, afterID int64) (map[string]int64, error) {
	var rows []struct {
		AgentID string `bun:"agent_id"`
		MaxID   int64  `bun:"max_id"`
	}
	err := s.db.NewSelect().Model((*Event)(nil)).Column("agent_id").ColumnExpr("MAX(id) AS max_id").
		Where("town_id = ?", town).Where("id > ?", afterID).Group("agent_id").Scan(ctx, &rows)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("changes of town %s after %d: %w", town, afterID, err)
	}
	agents := make(map[string]int64, len(rows))
	for _, r := range rows {
		agents[r.AgentID] = r.MaxID
	}
	return agents, nil
}

// UpstreamSeq returns the highest upstream sequence number stored for an
// agent's events from one upstream run, or 0: where a relay resumes.
func (s *Store) UpstreamSeq(ctx context.Context, k AgentKey, run string) (int64, error) {
	var seq sql.NullInt64
	err := s.db.NewSelect().Model((*Event)(nil)).ColumnExpr("MAX(upstream_seq)").
		Where("town_id = ?", k.Town).Where("agent_id = ?", k.Agent).Where("upstream_run = ?", run).
		Scan(ctx, &seq)
	if err != nil {
		return 0, fmt.Errorf("upstream cursor of %s: %w", k.Agent, err)
	}
	return seq.Int64, nil
}

// Last returns the newest event of an agent, or nil if it has none.
func (s *Store) Last(ctx context.Context, k AgentKey) (*Event, error) {
	var evs []Event
	q := s.db.NewSelect().Model(&evs).
		Where("agent_id = ?", k.Agent).Where("town_id = ?", k.Town).
		OrderExpr("id DESC").Limit(1)
	if err := q.Scan(ctx); err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("last event of %s: %w", k.Agent, err)
	}
	if len(evs) == 0 {
		return nil, nil
	}
	return &evs[0], nil
}

// After returns up to limit events of one agent (or town) with id >
// afterID, in id order.
func (s *Store) After(ctx context.Context, k AgentKey, afterID int64, limit int) ([]Event, error) {
	evs := make([]Event, 0, min(limit, 256))
	q := whereKey(s.db.NewSelect().Model(&evs), k).Where("id > ?", afterID).
		OrderExpr("id ASC").Limit(int64(limit))
	if err := q.Scan(ctx); err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("read events of %s: %w", k.Agent, err)
	}
	return evs, nil
}

// AfterBytes is After bounded by the events' data too: it stops before the
// event that would take the data past maxBytes, but returns at least one
// event when there is one. It is how a slow stream catches up within its
// memory budget: the sizes are read first, without the data.
func (s *Store) AfterBytes(ctx context.Context, k AgentKey, afterID int64, limit int, maxBytes int64) ([]Event, error) {
	var sizes []struct {
		ID   int64 `bun:"id"`
		Size int64 `bun:"size"`
	}
	q := whereKey(s.db.NewSelect().Model((*Event)(nil)).Column("id").ColumnExpr("LENGTH(data) AS size"), k).
		Where("id > ?", afterID).OrderExpr("id ASC").Limit(int64(limit))
	if err := q.Scan(ctx, &sizes); err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("read event sizes of %s: %w", k.Agent, err)
	}
	n, total := 0, int64(0)
	for n < len(sizes) && (n == 0 || total+sizes[n].Size <= maxBytes) {
		total += sizes[n].Size
		n++
	}
	if n == 0 {
		return nil, nil
	}
	evs, err := s.After(ctx, k, afterID, n)
	if err != nil {
		return nil, err
	}
	// Rows committed or pruned between the two reads: keep to the ids sized.
	last := sizes[n-1].ID
	for i := range evs {
		if evs[i].ID > last {
			return evs[:i], nil
		}
	}
	return evs, nil
}

// Agents lists the agents of a town that have events, newest activity first.
func (s *Store) Agents(ctx context.Context, town string) ([]AgentSummary, error) {
	var evs []Event
	err := s.db.NewSelect().Model(&evs).
		// The latest event in the agent's own rig: events another rig
		// posted as it before rigs were bound do not speak for it.
		Where("id IN (?)", s.db.NewSelect().TableExpr("agent_events AS e").
			Join("JOIN agents AS a ON a.town_id = e.town_id AND a.agent_id = e.agent_id AND a.rig_id = e.rig_id").
			ColumnExpr("MAX(e.id)").Where("e.town_id = ?", town).Group("e.agent_id")).
		OrderExpr("id DESC").
		Scan(ctx)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("list agents of %s: %w", town, err)
	}
	out := make([]AgentSummary, len(evs))
	for i, e := range evs {
		out[i] = AgentSummary{
			AgentID:     e.AgentID,
			RigID:       e.RigID,
			LastEventID: e.ID,
			LastType:    e.Type,
			LastEventAt: e.CreatedAt,
			Exited:      e.Type == TypeExited,
		}
		if out[i].Exited {
			// Best effort: an exit event written by hand may carry neither.
			var d struct {
				Reason   string `json:"reason"`
				ExitCode *int   `json:"exit_code"`
			}
			if json.Unmarshal(e.Data, &d) == nil {
				out[i].ExitReason, out[i].ExitCode = d.Reason, d.ExitCode
			}
		}
	}
	return out, nil
}

func (s *Store) markDirty(group []*appendReq) {
	if s.opts.Retain < 0 {
		return
	}
	s.dirtyMu.Lock()
	for _, r := range group {
		if !r.stored() {
			continue
		}
		for i := range r.events {
			s.dirty[townAgent{r.events[i].TownID, r.events[i].AgentID}] = struct{}{}
		}
	}
	s.dirtyMu.Unlock()
	select {
	case s.prunec <- struct{}{}:
	default:
	}
}

// pruneLoop deletes what retention no longer keeps, off the ingest path and
// at most once per PruneEvery, in small transactions that let appends in
// between.
func (s *Store) pruneLoop() {
	defer close(s.pdone)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-s.prunec:
		case <-s.pstop:
			return
		}
		if err := s.Prune(context.Background()); err != nil {
			s.log.Error("prune", "err", err)
		}
		t.Reset(s.opts.PruneEvery)
		select {
		case <-t.C:
		case <-s.pstop:
			return
		}
	}
}

// Prune deletes, for every agent appended to since the last pass, the events
// older than its newest Retain. It runs in the background; tests and
// operators may call it to prune now.
func (s *Store) Prune(ctx context.Context) error {
	// One pass at a time: a caller of Prune returns only after any pass
	// already under way (the background one) has finished too.
	s.pruneMu.Lock()
	defer s.pruneMu.Unlock()
	s.dirtyMu.Lock()
	agents := make([]townAgent, 0, len(s.dirty))
	for a := range s.dirty {
		agents = append(agents, a)
	}
	clear(s.dirty)
	s.dirtyMu.Unlock()
	for _, a := range agents {
		if err := s.pruneAgent(ctx, a); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) pruneAgent(ctx context.Context, k townAgent) error {
	if s.opts.Retain < 0 {
		return nil
	}
	agent := k.town + "/" + k.agent // for errors
	var cutoff int64
	err := s.db.NewSelect().Model((*Event)(nil)).Column("id").
		Where("town_id = ?", k.town).Where("agent_id = ?", k.agent).OrderExpr("id DESC").
		Offset(int64(s.opts.Retain)).Limit(1).Scan(ctx, &cutoff)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("prune %s: %w", agent, err)
	}
	// The mark goes first: if the process dies between the two, a client
	// below the mark is told of a gap that is not there yet — never the
	// other way round.
	mark := &PruneMark{TownID: k.town, AgentID: k.agent, PrunedThrough: cutoff}
	if _, err := s.db.NewInsert().Model(mark).
		On("CONFLICT (town_id, agent_id) DO UPDATE").
		Set("pruned_through = EXCLUDED.pruned_through").
		Exec(ctx); err != nil {
		return fmt.Errorf("prune %s: mark: %w", agent, err)
	}
	for {
		res, err := s.db.NewDelete().Model((*Event)(nil)).
			Where("id IN (?)", s.db.NewSelect().Model((*Event)(nil)).Column("id").
				Where("town_id = ?", k.town).Where("agent_id = ?", k.agent).Where("id <= ?", cutoff).
				OrderExpr("id ASC").Limit(500)).
			Exec(ctx)
		if err != nil {
			return fmt.Errorf("prune %s: %w", agent, err)
		}
		if n, _ := res.RowsAffected(); n < 500 {
			return nil
		}
	}
}

// PrunedThrough returns the id up to which retention has deleted the
// agent's events, or 0 if nothing was pruned. Retention counts each agent
// of each town on its own.
func (s *Store) PrunedThrough(ctx context.Context, k AgentKey) (int64, error) {
	var m PruneMark
	err := s.db.NewSelect().Model(&m).Where("town_id = ?", k.Town).Where("agent_id = ?", k.Agent).Scan(ctx)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("prune mark of %s: %w", k.Agent, err)
	}
	return m.PrunedThrough, nil
}

// PrunedAfter lists the agents of town whose retention has deleted events
// with ids above afterID, each with the id through which it has: a town
// stream at cursor afterID has missed those agents' events up to there.
func (s *Store) PrunedAfter(ctx context.Context, town string, afterID int64) ([]PruneMark, error) {
	var marks []PruneMark
	err := s.db.NewSelect().Model(&marks).Where("town_id = ?", town).Where("pruned_through > ?", afterID).
		OrderExpr("agent_id").Scan(ctx)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("prune marks of %s: %w", town, err)
	}
	return marks, nil
}

// Retain is how many of each agent's newest events retention keeps, or 0
// when it keeps everything.
func (s *Store) Retain() int { return max(s.opts.Retain, 0) }

// Oldest returns the smallest id still held for an agent, or 0 if none.
func (s *Store) Oldest(ctx context.Context, k AgentKey) (int64, error) {
	evs, err := s.After(ctx, k, 0, 1)
	if err != nil || len(evs) == 0 {
		return 0, err
	}
	return evs[0].ID, nil
}

// Close stops accepting appends, commits what is queued, stops the pruner and
// closes the database.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.appendc)
	s.mu.Unlock()
	<-s.wdone
	close(s.pstop)
	<-s.pdone
	return s.db.Close()
}

// redact drops a password from a database URL before it is shown.
func redact(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "<unparsable url>"
	}
	return u.Redacted()
}
