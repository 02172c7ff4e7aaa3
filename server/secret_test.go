package server

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentstream/agentstream/model"
)

// TestSecretNeverRegeneratedOverADatabase: a data directory that holds a
// database but whose secret is gone, or empty (what a crash mid-write used
// to leave), gets an error that says what to do, and no new secret.
func TestSecretNeverRegeneratedOverADatabase(t *testing.T) {
	for _, name := range []string{"missing", "empty"} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, DBFile), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if name == "empty" {
				os.WriteFile(filepath.Join(dir, "secret"), nil, 0o600)
			}
			_, err := LoadSecret("", dir)
			if err == nil {
				t.Fatal("a new secret was made for a directory holding a database")
			}
			if b, _ := os.ReadFile(filepath.Join(dir, "secret")); len(b) != 0 {
				t.Fatalf("secret written: %q", b)
			}
			if name == "missing" && !strings.Contains(err.Error(), "AGENTSTREAM_SECRET") {
				t.Fatalf("the error does not say what to do: %v", err)
			}
		})
	}
}

// TestNewSecretAndDataArePrivate: a new data directory gets a whole secret,
// and the secret, the database and its WAL and shared-memory files are
// mode 0600 even with a permissive umask and directory.
func TestNewSecretAndDataArePrivate(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	parent := t.TempDir()
	os.Chmod(parent, 0o777)
	dir := filepath.Join(parent, "new", "data")
	secret, err := LoadSecret("", dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(secret) != 64 {
		t.Fatalf("secret of %d bytes", len(secret))
	}
	again, err := LoadSecret("", dir)
	if err != nil || string(again) != string(secret) {
		t.Fatalf("second load: %q %v", again, err)
	}
	store, err := model.Open(context.Background(), filepath.Join(dir, DBFile), model.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if err := store.Append(context.Background(), []model.Event{{TownID: "t", RigID: "r", AgentID: "a", Type: "x", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"secret", DBFile, DBFile + "-wal", DBFile + "-shm"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if m := st.Mode().Perm(); m != 0o600 {
			t.Errorf("%s is mode %o, want 600", f, m)
		}
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Errorf("data directory is mode %o, want 700", st.Mode().Perm())
	}
	if _, err := LoadSecret("short", dir); err == nil || !strings.Contains(err.Error(), "AGENTSTREAM_SECRET") {
		t.Errorf("a short AGENTSTREAM_SECRET: %v", err)
	}
}

// TestOtherSecretHinted: a token signed with another secret than the
// server's (another --data, say) is refused with a message that says so.
func TestOtherSecretHinted(t *testing.T) {
	e := newEnv(t)
	other, err := NewAuth([]byte(strings.Repeat("o", 32)))
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := other.MintViewer("t1", time.Hour)
	code, _, v := e.do("GET", "/api/towns/t1/agents", tok, "", nil)
	msg, _ := v["error"].(map[string]any)["message"].(string)
	if code != 401 || errCode(v) != "invalid_token" || !strings.Contains(msg, "another secret") {
		t.Fatalf("a token of another secret: %d %v, want 401 invalid_token saying so", code, v)
	}
}
