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
			_, err := m.DB().NewCreateTable().Model((*PruneMark)(nil)).IfNotExists().Exec(ctx)
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
	return ms
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
	// (agent_id, id) serves every stream read: one agent, after a cursor.
	// (town_id, agent_id, id) serves the agent list of a town.
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
