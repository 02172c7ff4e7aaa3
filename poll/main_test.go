package poll

import (
	"os"
	"testing"

	"github.com/agentstream/agentstream/model/pgtest"
)

// current is the backend of this run of the tests: TestMain runs the
// package's tests once per backend.
var current pgtest.Backend

func TestMain(m *testing.M) { os.Exit(pgtest.RunEach(m, &current)) }
