package model

import (
	"context"
	"fmt"

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
	return ms
}

func createAgentEvents(ctx context.Context, db *bun.DB) error {
	if _, err := db.NewCreateTable().Model((*Event)(nil)).IfNotExists().Exec(ctx); err != nil {
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
