package model

import (
	"os"
	"testing"

	"github.com/agentstream/agentstream/model/pgtest"
)

// current is the backend of this run of the tests: TestMain runs the
// package's tests once per backend.
var current pgtest.Backend

func TestMain(m *testing.M) { os.Exit(pgtest.RunEach(m, &current)) }

// tempDSN is a fresh database of the current backend.
func tempDSN(t testing.TB) string {
	t.Helper()
	t.Logf("backend %s", current.Name)
	return current.DSN(t)
}

// onlySQLite skips a test of what only SQLite has (a data file).
func onlySQLite(t *testing.T) {
	if current.Name != "sqlite" {
		t.Skipf("SQLite only; backend %s", current.Name)
	}
}
