package container

import (
	"encoding/json"
	"os"
	"testing"
)

// TestAgentsNeverSeeAgentstreamSecrets: no AGENTSTREAM_ variable of the
// container's environment reaches an agent (the server's signing secret
// would let it mint tokens for every town); with the minimal environment
// only the base variables and the allow-list do.
func TestAgentsNeverSeeAgentstreamSecrets(t *testing.T) {
	t.Setenv("AGENTSTREAM_SECRET", "server-signing-secret-0123456789abcdef")
	t.Setenv(SecretEnv, testSecret)
	t.Setenv("AGENTSTREAM_DATA", "/var/lib/agentstream")
	t.Setenv("MY_TOOL_KEY", "tool")
	t.Setenv("MY_ALLOWED", "allowed")
	type seen struct{ Leaked, Tool, Allowed, Path, Agent string }
	see := func(opts Options) seen {
		e := newEnv(t, opts)
		e.start(t, "a1", "env.sh")
		evs, _ := e.waitExit(t, "a1")
		var s seen
		for _, ev := range evs {
			if ev.Type == "env" {
				json.Unmarshal(ev.Data, &s)
				return s
			}
		}
		t.Fatalf("no env event in %+v", evs)
		return s
	}
	if got := see(Options{}); got != (seen{Tool: "tool", Allowed: "allowed", Path: "set", Agent: "a1"}) {
		t.Fatalf("inherited environment: %+v; want no AGENTSTREAM_ variable, the rest kept", got)
	}
	minimal := AgentEnv(os.Environ(), true, []string{"MY_ALLOWED", "AGENTSTREAM_SECRET"})
	if got := see(Options{Env: minimal}); got != (seen{Allowed: "allowed", Path: "set", Agent: "a1"}) {
		t.Fatalf("minimal environment: %+v; want PATH and the allow-list only", got)
	}
}
