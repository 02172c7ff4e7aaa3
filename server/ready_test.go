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
	for _, table := range []string{"agent_events", "store_probe"} {
		for _, op := range []string{"INSERT", "UPDATE"} {
			q := "CREATE TRIGGER fail_" + op + "_" + table + " BEFORE " + op + " ON " + table +
				" BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
			if _, err := db.ExecContext(t.Context(), q); err != nil {
				t.Fatal(err)
			}
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
	for _, table := range []string{"agent_events", "store_probe"} {
		for _, op := range []string{"INSERT", "UPDATE"} {
			if _, err := db.ExecContext(t.Context(), "DROP TRIGGER fail_"+op+"_"+table); err != nil {
				t.Fatal(err)
			}
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
