package server

import (
	"os"
	"testing"

	"github.com/agentstream/agentstream/model/pgtest"
)

// current is the backend of this run of the tests: TestMain runs the
// package's tests once on SQLite and once on PostgreSQL.
var current pgtest.Backend

func TestMain(m *testing.M) { os.Exit(pgtest.RunEach(m, &current)) }

// pgDSN returns a fresh PostgreSQL database for a test of what only
// PostgreSQL does (several instances on one database), or skips the test
// on the SQLite run.
func pgDSN(t testing.TB) string {
	t.Helper()
	onlyPostgres(t)
	return current.DSN(t)
}

// onlyPostgres skips a test on the SQLite run.
func onlyPostgres(t testing.TB) {
	t.Helper()
	if current.Cluster == nil {
		t.Skipf("PostgreSQL only; backend %s", current.Name)
	}
}

// onlySQLite skips a test of what only SQLite has (a data file) on the
// PostgreSQL run.
func onlySQLite(t testing.TB) {
	t.Helper()
	if current.Name != "sqlite" {
		t.Skipf("SQLite only; backend %s", current.Name)
	}
}
