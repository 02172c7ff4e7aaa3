package model

import (
	"context"
	"crypto/rand"
	"database/sql"
	"fmt"
	"net/url"

	"github.com/uptrace/bun"
	"github.com/uptrace/bun/dialect/pgdialect"

	// pgx through database/sql: the most used and best kept PostgreSQL
	// driver for Go; bun's own pgdriver trails bun's releases.
	_ "github.com/jackc/pgx/v5/stdlib"
)

// postgresDialect is for several instances on one PostgreSQL database.
type postgresDialect struct {
	dsn string // for the LISTEN connection, which is not the pool's
	// origin names this store in its notifications, so that its own
	// LISTEN skips them: its commits reach its feeds through OnCommit.
	origin string
}

// lockTowns takes a transaction-scoped advisory lock per town before the
// group's ids are drawn. Ids come from a sequence, and transactions may
// commit out of the order they drew ids in: a reader of "id > cursor"
// could then move past an id that commits a moment later, and never see
// it. Under the lock, a town's next ids are drawn only after the last
// holder has committed, so each town's ids commit in id order — one order
// per town, which the town stream needs too.
func (postgresDialect) lockTowns(ctx context.Context, tx bun.Tx, towns []string) error {
	for _, t := range towns {
		if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", t); err != nil {
			return fmt.Errorf("lock town %s: %w", t, err)
		}
	}
	return nil
}

// migrationLockKey is the advisory lock instances take to migrate.
const migrationLockKey = 0x61677374 // "agst"

// lockMigrations holds a session advisory lock on a connection of its own
// while the migrations run: instances started together on a new database
// would otherwise create the same tables at once and fail.
func (postgresDialect) lockMigrations(ctx context.Context, db *bun.DB) (func(), error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("migration lock: %w", err)
	}
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock(?)", migrationLockKey); err != nil {
		conn.Close()
		return nil, fmt.Errorf("migration lock: %w", err)
	}
	return func() {
		conn.ExecContext(context.Background(), "SELECT pg_advisory_unlock(?)", migrationLockKey)
		conn.Close()
	}, nil
}

// openPostgres opens a PostgreSQL database by URL.
func openPostgres(ctx context.Context, dsn string) (*bun.DB, dialect, error) {
	// bun writes every value into the SQL text, so no two statements are
	// alike: pgx's default, preparing and caching each statement, would
	// cost a round trip and a server-side statement per query for nothing.
	// The simple protocol sends each in one round trip.
	conn := dsn
	if u, err := url.Parse(dsn); err == nil && !u.Query().Has("default_query_exec_mode") {
		q := u.Query()
		q.Set("default_query_exec_mode", "simple_protocol")
		u.RawQuery = q.Encode()
		conn = u.String()
	}
	sqldb, err := sql.Open("pgx", conn)
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w", redact(dsn), err)
	}
	sqldb.SetMaxOpenConns(16)
	sqldb.SetMaxIdleConns(16)
	db := bun.NewDB(sqldb, pgdialect.New())
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("open %s: %w", redact(dsn), err)
	}
	return db, postgresDialect{dsn: dsn, origin: rand.Text()}, nil
}
