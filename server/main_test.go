package server

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/agentstream/agentstream/model/pgtest"
)

// pg is the package's PostgreSQL cluster, or nil where there is none
// (then pgSkip says why).
var (
	pg     *pgtest.Cluster
	pgSkip error
)

func TestMain(m *testing.M) {
	pg, pgSkip = pgtest.Start()
	code := m.Run()
	if pg != nil {
		pg.Stop()
	}
	os.Exit(code)
}

// pgDSN returns a fresh PostgreSQL database for the test, or skips it (in
// CI, fails it) when no cluster could start.
func pgDSN(t testing.TB) string {
	t.Helper()
	if pg == nil {
		if fail, msg := pgtest.Skip(pgSkip); fail {
			t.Fatal(msg)
		} else {
			t.Skip(msg)
		}
	}
	dsn, err := pg.NewDatabase(context.Background())
	if err != nil {
		t.Fatal(fmt.Errorf("new database: %w", err))
	}
	return dsn
}
