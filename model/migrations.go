package model

import (
	"context"
	"fmt"
	"time"

	"github.com/uptrace/bun"
	"github.com/uptrace/bun/migrate"
)

// migrations is the schema history. Entries are only ever appended: a
// database created by an older binary is brought forward at Open.
func migrations() *migrate.Migrations {
	ms := migrate.NewMigrations()
	ms.Add(migrate.Migration{
		Name:    "20261125000001",
		Comment: "agent_events",
		Up: func(ctx context.Context, m *migrate.Migrator, _ *migrate.Migration) error {
			return createAgentEvents(ctx, m.DB())
		},
	})
	ms.Add(migrate.Migration{
		Name:    "20261125000002",
		Comment: "agent_prune_marks",
		Up: func(ctx context.Context, m *migrate.Migrator, _ *migrate.Migration) error {
			_, err := m.DB().NewCreateTable().Model((*pruneMarkV1)(nil)).IfNotExists().Exec(ctx)
			return err
		},
	})
	ms.Add(migrate.Migration{
		Name:    "20261125000003",
		Comment: "stream_tickets",
		Up: func(ctx context.Context, m *migrate.Migrator, _ *migrate.Migration) error {
			_, err := m.DB().NewCreateTable().Model((*StreamTicket)(nil)).IfNotExists().Exec(ctx)
			return err
		},
	})
	ms.Add(migrate.Migration{
		Name:    "20261125000004",
		Comment: "agent_events upstream_run, upstream_seq",
		Up: func(ctx context.Context, m *migrate.Migrator, _ *migrate.Migration) error {
			db := m.DB()
			for _, col := range []string{"upstream_run VARCHAR", "upstream_seq BIGINT"} {
				if _, err := db.ExecContext(ctx, "ALTER TABLE agent_events ADD COLUMN "+col); err != nil {
					return fmt.Errorf("add column %s: %w", col, err)
				}
			}
			// Unique: a relayed event is stored once, whatever goes wrong
			// around it. Events written here have NULLs, which never clash.
			_, err := db.NewCreateIndex().Model((*Event)(nil)).Index("agent_events_upstream").Unique().IfNotExists().
				Column("town_id", "agent_id", "upstream_run", "upstream_seq").Exec(ctx)
			return err
		},
	})
	ms.Add(migrate.Migration{
		Name:    "20261127000005",
		Comment: "agents bound to rigs; prune marks and indexes per (town, agent)",
		Up: func(ctx context.Context, m *migrate.Migrator, _ *migrate.Migration) error {
			return identityPerTown(ctx, m.DB())
		},
	})
	ms.Add(migrate.Migration{
		Name:    "20261127000006",
		Comment: "idempotency_keys, store_probe",
		Up: func(ctx context.Context, m *migrate.Migrator, _ *migrate.Migration) error {
			db := m.DB()
			if _, err := db.NewCreateTable().Model((*idempotencyKeyV1)(nil)).IfNotExists().Exec(ctx); err != nil {
				return err
			}
			if _, err := db.NewCreateTable().Model((*storeProbe)(nil)).IfNotExists().Exec(ctx); err != nil {
				return err
			}
			_, err := db.NewCreateIndex().Model((*idempotencyKeyV1)(nil)).Index("idempotency_keys_created_at").
				IfNotExists().Column("created_at").Exec(ctx)
			return err
		},
	})
	ms.Add(migrate.Migration{
		Name:    "20261128000007",
		Comment: "agent_events (town_id, id): the town stream",
		Up: func(ctx context.Context, m *migrate.Migrator, _ *migrate.Migration) error {
			// A town stream reads every agent of a town after a cursor, in
			// id order: this index makes that a range scan.
			_, err := m.DB().NewCreateIndex().Model((*Event)(nil)).Index("agent_events_town_id").
				IfNotExists().Column("town_id", "id").Exec(ctx)
			return err
		},
	})
	return ms
}

// idempotencyKeyV1 is idempotency_keys as migration 6 created it.
type idempotencyKeyV1 struct {
	bun.BaseModel `bun:"table:idempotency_keys"`

	TownID    string    `bun:"town_id,pk"`
	AgentID   string    `bun:"agent_id,pk"`
	Key       string    `bun:"key,pk"`
	Hash      string    `bun:"hash,notnull"`
	IDs       string    `bun:"ids,notnull"`
	CreatedAt time.Time `bun:"created_at,notnull"`
}

// pruneMarkV1 is agent_prune_marks as the second migration created it,
// keyed by agent id alone: retention then counted one agent id's events
// across towns.
type pruneMarkV1 struct {
	bun.BaseModel `bun:"table:agent_prune_marks"`

	AgentID       string `bun:"agent_id,pk"`
	PrunedThrough int64  `bun:"pruned_through,notnull"`
}

// identityPerTown makes (town, agent) the identity of an agent everywhere.
//
//   - agents binds each agent of a town to the rig of its first event, as
//     ingest will from now on. Events another rig posted as the agent
//     before this migration stay where they are.
//   - agent_prune_marks is keyed by (town, agent). An old mark, keyed by the
//     agent id alone, is copied to every town that has that agent id (in its
//     events or its tickets): a mark too high only tells of a gap that may
//     not be there, one too low would hide a real one.
//   - the index on agent_id alone goes: every read names the town.
func identityPerTown(ctx context.Context, db *bun.DB) error {
	stmts := []string{
		`CREATE TABLE agents (town_id VARCHAR NOT NULL, agent_id VARCHAR NOT NULL, rig_id VARCHAR NOT NULL,
			created_at TIMESTAMP NOT NULL, PRIMARY KEY (town_id, agent_id))`,
		`INSERT INTO agents (town_id, agent_id, rig_id, created_at)
			SELECT e.town_id, e.agent_id, e.rig_id, e.created_at FROM agent_events AS e
			WHERE e.id IN (SELECT MIN(id) FROM agent_events GROUP BY town_id, agent_id)`,
		`ALTER TABLE agent_prune_marks RENAME TO agent_prune_marks_v1`,
		`CREATE TABLE agent_prune_marks (town_id VARCHAR NOT NULL, agent_id VARCHAR NOT NULL,
			pruned_through BIGINT NOT NULL, PRIMARY KEY (town_id, agent_id))`,
		`INSERT INTO agent_prune_marks (town_id, agent_id, pruned_through)
			SELECT k.town_id, k.agent_id, m.pruned_through FROM agent_prune_marks_v1 AS m
			JOIN (SELECT DISTINCT town_id, agent_id FROM agent_events
				UNION SELECT DISTINCT town_id, agent_id FROM stream_tickets) AS k ON k.agent_id = m.agent_id`,
		`DROP TABLE agent_prune_marks_v1`,
		`DROP INDEX IF EXISTS agent_events_agent_id_id`,
		`CREATE INDEX IF NOT EXISTS stream_tickets_town_expires ON stream_tickets (town_id, expires_at)`,
	}
	return db.RunInTx(ctx, nil, func(ctx context.Context, tx bun.Tx) error {
		for _, q := range stmts {
			if _, err := tx.ExecContext(ctx, q); err != nil {
				return fmt.Errorf("%.40s...: %w", q, err)
			}
		}
		return nil
	})
}

// eventV1 is agent_events as the first migration created it. Migrations
// name their own shapes: the table the Event model describes today is the
// sum of all of them.
type eventV1 struct {
	bun.BaseModel `bun:"table:agent_events"`

	ID        int64     `bun:"id,pk,autoincrement"`
	TownID    string    `bun:"town_id,notnull"`
	RigID     string    `bun:"rig_id,notnull"`
	AgentID   string    `bun:"agent_id,notnull"`
	Type      string    `bun:"type,notnull"`
	Data      string    `bun:"data,type:text,notnull"`
	CreatedAt time.Time `bun:"created_at,notnull"`
}

func createAgentEvents(ctx context.Context, db *bun.DB) error {
	if _, err := db.NewCreateTable().Model((*eventV1)(nil)).IfNotExists().Exec(ctx); err != nil {
		return fmt.Errorf("create agent_events: %w", err)
	}
	// (town_id, agent_id, id) serves every stream read — one agent, after a
	// cursor — and the agent list of a town. (agent_id, id) went in
	// identityPerTown.
	for name, cols := range map[string][]string{
		"agent_events_agent_id_id":      {"agent_id", "id"},
		"agent_events_town_agent_id_id": {"town_id", "agent_id", "id"},
	} {
		q := db.NewCreateIndex().Model((*Event)(nil)).Index(name).IfNotExists().Column(cols...)
		if _, err := q.Exec(ctx); err != nil {
			return fmt.Errorf("create index %s: %w", name, err)
		}
	}
	return nil
}

func runMigrations(ctx context.Context, db *bun.DB) error {
	m := migrate.NewMigrator(db, migrations(), migrate.WithMarkAppliedOnSuccess(true))
	if err := m.Init(ctx); err != nil {
		return fmt.Errorf("migrations init: %w", err)
	}
	if _, err := m.Migrate(ctx); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return nil
}
