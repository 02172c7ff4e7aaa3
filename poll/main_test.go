package poll

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/agentstream/agentstream/model/pgtest"
)

// backend is one database the scheduler's tests run against: TestMain
// runs the package's tests once per backend of its table.
type backend struct {
	name string
	dsn  func(t testing.TB) string // a fresh, empty database
}

var current backend

func TestMain(m *testing.M) {
	backends := []backend{{name: "sqlite", dsn: func(t testing.TB) string {
		return filepath.Join(t.TempDir(), "agentstream.db")
	}}}
	cluster, err := pgtest.Start()
	if err != nil {
		fail, msg := pgtest.Skip(err)
		fmt.Fprintln(os.Stderr, msg)
		if fail {
			os.Exit(1)
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
