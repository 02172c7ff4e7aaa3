package server

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/agentstream/agentstream/model"
)

// FuzzParseIngest feeds the ingest body parser arbitrary bytes. Seeds are the
// bodies in ../testdata/ingest. Whatever the input, the parser must not
// panic, and what it accepts must be storable as is: 1 to MaxBatch events,
// each with a valid type and compact JSON data (one SSE data line) of at most
// MaxDataBytes.
//
//	go test ./server -run '^$' -fuzz FuzzParseIngest -fuzztime 60s
func FuzzParseIngest(f *testing.F) {
	seeds, err := filepath.Glob("../testdata/ingest/*.json")
	if err != nil || len(seeds) == 0 {
		f.Fatalf("no seeds in ../testdata/ingest: %v", err)
	}
	for _, p := range seeds {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		in, err := ParseIngest(body)
		if err != nil {
			if _, ok := err.(*apiError); !ok {
				t.Fatalf("error %v is not an API error", err)
			}
			if in != nil {
				t.Fatal("events returned with an error")
			}
			return
		}
		if len(in) < 1 || len(in) > MaxBatch {
			t.Fatalf("accepted %d events", len(in))
		}
		for _, e := range in {
			if msg := checkType(e.Type); msg != "" {
				t.Fatalf("accepted type %q: %s", e.Type, msg)
			}
			if !json.Valid(e.Data) || len(e.Data) > MaxDataBytes || bytes.ContainsAny(e.Data, "\r\n") {
				t.Fatalf("accepted data %q", e.Data)
			}
			if e.AgentID != "" && model.CheckID("agent_id", e.AgentID) != "" {
				t.Fatalf("accepted agent_id %q", e.AgentID)
			}
		}
	})
}
