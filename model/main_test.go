package model

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/agentstream/agentstream/model/pgtest"
)

// backend is one database the store's tests run against.
type backend struct {
	name string
	// dsn returns a fresh, empty database for one test.
	dsn func(t testing.TB) string
}

// current is the backend of this run of the tests: TestMain runs the
// package's tests once per backend of its table.
var current backend

func TestMain(m *testing.M) {
	backends := []backend{{name: "sqlite", dsn: func(t testing.TB) string {
		return filepath.Join(t.TempDir(), "agentstream.db")
	}}}
	cluster, err := pgtest.Start()
	if err != nil {
		if fail, msg := pgtest.Skip(err); fail {
			fmt.Fprintln(os.Stderr, msg)
			os.Exit(1)
		} else {
			fmt.Fprintln(os.Stderr, msg+"; the store's tests run on SQLite only")
		}
	} else {
		backends = append(backends, backend{name: "postgres", dsn: func(t testing.TB) string {
			dsn, err := cluster.NewDatabase(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			return dsn
		}})
	}
	code := 0
	for _, b := range backends {
		current = b
		fmt.Printf("=== backend %s\n", b.name)
		if c := m.Run(); c != 0 {
			code = c
		}
	}
	if cluster != nil {
		cluster.Stop()
	}
	os.Exit(code)
}

// tempDSN is a fresh database of the current backend, for a test that
// opens it more than once.
func tempDSN(t testing.TB) string {
	t.Helper()
	t.Logf("backend %s", current.name)
	return current.dsn(t)
}

// onlySQLite skips a test of what only SQLite has (a data file).
func onlySQLite(t *testing.T) {
	if current.name != "sqlite" {
		t.Skipf("SQLite only; backend %s", current.name)
	}
}
