package server

import (
	"testing"
)

// TestReadyzReflectsWrites: while the store cannot commit (here every
// insert is refused by the database, as a full disk or a read-only
// filesystem refuses it), ingest answers 503, /readyz answers 503 with the
// reason and the writable gauge is 0; once the store can commit again,
// /readyz says ready by itself, with no client write, and the gauge is 1.
func TestReadyzReflectsWrites(t *testing.T) {
	e := newEnv(t)
	e.mustPost(e.agent, steps(1))
	if code, _, _ := e.do("GET", "/readyz", "", "", nil); code != 200 {
		t.Fatalf("readyz before the failure: %d", code)
	}
	db := e.store.DB()
	failing := failWrites[current.Name]
	for _, q := range failing.on {
		if _, err := db.ExecContext(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	if code, v := e.post(e.agent, `{"type":"step"}`); code != 503 || errCode(v) != "store_unavailable" {
		t.Fatalf("ingest while the store cannot commit: %d %v", code, v)
	}
	code, _, v := e.do("GET", "/readyz", "", "", nil)
	if code != 503 || errCode(v) != "store_not_writable" {
		t.Fatalf("readyz while the store cannot commit: %d %v", code, v)
	}
	if g := e.metric("agentstream_store_writable"); g != 0 {
		t.Fatalf("agentstream_store_writable %v, want 0", g)
	}
	for _, q := range failing.off {
		if _, err := db.ExecContext(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, "readyz to say ready again", func() bool {
		code, _, _ := e.do("GET", "/readyz", "", "", nil)
		return code == 200
	})
	if g := e.metric("agentstream_store_writable"); g != 1 {
		t.Fatalf("agentstream_store_writable %v after recovery, want 1", g)
	}
	e.mustPost(e.agent, steps(1))
}

// failWrites holds, per backend, the statements that make every insert and
// update of the event and probe tables fail as a full disk fails them, and
// those that undo it.
var failWrites = map[string]struct{ on, off []string }{
	"sqlite": {
		on: []string{
			"CREATE TRIGGER fail_insert_events BEFORE INSERT ON agent_events BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
			"CREATE TRIGGER fail_update_events BEFORE UPDATE ON agent_events BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
			"CREATE TRIGGER fail_insert_probe BEFORE INSERT ON store_probe BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
			"CREATE TRIGGER fail_update_probe BEFORE UPDATE ON store_probe BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
		},
		off: []string{
			"DROP TRIGGER fail_insert_events", "DROP TRIGGER fail_update_events",
			"DROP TRIGGER fail_insert_probe", "DROP TRIGGER fail_update_probe",
		},
	},
	"postgres": {
		on: []string{
			`CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$`,
			"CREATE TRIGGER fail_events BEFORE INSERT OR UPDATE ON agent_events FOR EACH ROW EXECUTE FUNCTION disk_full()",
			"CREATE TRIGGER fail_probe BEFORE INSERT OR UPDATE ON store_probe FOR EACH ROW EXECUTE FUNCTION disk_full()",
		},
		off: []string{"DROP TRIGGER fail_events ON agent_events", "DROP TRIGGER fail_probe ON store_probe", "DROP FUNCTION disk_full"},
	},
}
