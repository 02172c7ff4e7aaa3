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
	"time"

	"github.com/uptrace/bun"
	"github.com/uptrace/bun/dialect/sqlitedialect"

	// modernc.org/sqlite is SQLite compiled to pure Go: the binary needs no
	// cgo and no system library, so `go run .` works on a bare machine.
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
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
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "synchronous(FULL)")
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
	if err := walMode(ctx, db); err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("open %s: %w", path, err)
	}
	return db, sqliteDialect{path: path}, nil
}

// walMode puts the database in WAL mode, which the file keeps. Switching
// a new file takes a lock that SQLite does not wait for (the busy timeout
// does not apply): another instance opening the same new file at the same
// moment fails it with SQLITE_BUSY. So it is retried, for as long as the
// busy timeout would have waited.
func walMode(ctx context.Context, db *bun.DB) error {
	deadline := time.Now().Add(10 * time.Second)
	wait := time.Millisecond
	for {
		var mode string
		err := db.QueryRowContext(ctx, "PRAGMA journal_mode=WAL").Scan(&mode)
		switch {
		case err == nil && mode == "wal":
			return nil
		case err == nil:
			return fmt.Errorf("journal mode %q, want wal", mode)
		case !isBusy(err) || time.Now().After(deadline):
			return err
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
}

// isBusy reports whether err is SQLite's SQLITE_BUSY (or one of its
// extended codes).
func isBusy(err error) bool {
	var se *sqlite.Error
	return errors.As(err, &se) && se.Code()&0xff == sqlite3.SQLITE_BUSY
}
