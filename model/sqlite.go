package model

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"syscall"

	"github.com/uptrace/bun"
	"github.com/uptrace/bun/dialect/sqlitedialect"

	// modernc.org/sqlite is SQLite compiled to pure Go: the binary needs no
	// cgo and no system library, so `go run .` works on a bare machine.
	_ "modernc.org/sqlite"
)

// sqliteDialect is the embedded default: one file, one writer.
type sqliteDialect struct {
	path string
}

// lockTowns does nothing: BEGIN IMMEDIATE already holds the database's one
// write lock, so transactions commit one at a time, in id order.
func (sqliteDialect) lockTowns(context.Context, bun.Tx, []string) error { return nil }

// lockMigrations holds an exclusive flock on the database file while the
// migrations run: processes opening a new file together would otherwise
// apply the same migration twice (one migration is several statements).
// SQLite's own locks are fcntl locks, which flock does not touch.
func (d sqliteDialect) lockMigrations(context.Context, *bun.DB) (func(), error) {
	f, err := os.Open(d.path)
	if err != nil {
		return nil, fmt.Errorf("migration lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("migration lock: %w", err)
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// notify does nothing: the one process that writes tells its own feeds.
func (sqliteDialect) notify(context.Context, bun.Tx, []AgentKey) error { return nil }

func (sqliteDialect) listen(context.Context, *slog.Logger, func([]AgentKey)) error {
	return ErrNoListen
}

// openSQLite opens the SQLite file at path, creating it if need be.
//
// SQLite runs in WAL mode with synchronous=FULL: a commit is fsynced to the
// WAL before Append returns, so an acknowledged event survives kill -9 of the
// process and also power loss. Group commit is what keeps that affordable.
func openSQLite(ctx context.Context, path string) (*bun.DB, dialect, error) {
	if path == "" {
		return nil, nil, errors.New("open: empty sqlite path")
	}
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, nil, fmt.Errorf("open: %w", err)
		}
	}
	// The file is made here, private, rather than by SQLite with the
	// umask's mode: events may hold anything an agent printed. SQLite
	// gives its WAL and shared-memory files the database file's mode.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w", path, err)
	}
	f.Close()
	q := url.Values{}
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(FULL)")
	q.Add("_pragma", "busy_timeout(10000)")
	// BEGIN IMMEDIATE takes the write lock up front, so two writers (another
	// process on the same file) wait for each other instead of failing on a
	// lock upgrade.
	q.Set("_txlock", "immediate")
	sqldb, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w", path, err)
	}
	sqldb.SetMaxOpenConns(8)
	sqldb.SetMaxIdleConns(8)
	db := bun.NewDB(sqldb, sqlitedialect.New())
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("open %s: %w", path, err)
	}
	return db, sqliteDialect{path: path}, nil
}
