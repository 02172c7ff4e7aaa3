package model

import (
	"context"
	"encoding/json"
	"testing"
)

var benchData = json.RawMessage(`{"part":{"type":"text","text":"Running the test suite now"},"delta":" now"}`)

func benchEvent() Event {
	return Event{TownID: "t", RigID: "r", AgentID: "a", Type: "message.part.updated", Data: benchData}
}

// BenchmarkAppendBatch100: one Append of 100 events per op.
func BenchmarkAppendBatch100(b *testing.B) {
	s := openTemp(b, Options{Retain: -1})
	ctx := context.Background()
	batch := make([]Event, 100)
	b.ResetTimer()
	for b.Loop() {
		for i := range batch {
			batch[i] = benchEvent()
		}
		if err := s.Append(ctx, batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*len(batch))/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkAppendBatch100Parallel: batches of 100 from 8 goroutines, so
// group commit shares each fsync between batches.
func BenchmarkAppendBatch100Parallel(b *testing.B) {
	s := openTemp(b, Options{Retain: -1})
	ctx := context.Background()
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		batch := make([]Event, 100)
		for pb.Next() {
			for i := range batch {
				batch[i] = benchEvent()
			}
			if err := s.Append(ctx, batch); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N*100)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkConcurrentSingleAppends: 64 goroutines each appending one event at
// a time, with group commit (the default) and with a transaction per Append.
// The ratio of the two events/s figures is what group commit buys.
func BenchmarkConcurrentSingleAppends(b *testing.B) {
	for _, bc := range []struct {
		name string
		opts Options
	}{
		{"group", Options{Retain: -1}},
		{"nogroup", Options{Retain: -1, NoGroupCommit: true}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := openTemp(b, bc.opts)
			ctx := context.Background()
			b.SetParallelism(32) // 32 x GOMAXPROCS writers
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := s.Append(ctx, []Event{benchEvent()}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
		})
	}
}

// BenchmarkAfter2000: reading one agent's 2000 retained events.
func BenchmarkAfter2000(b *testing.B) {
	s := openTemp(b, Options{})
	ctx := context.Background()
	for range 20 {
		batch := make([]Event, 100)
		for i := range batch {
			batch[i] = benchEvent()
		}
		if err := s.Append(ctx, batch); err != nil {
			b.Fatal(err)
		}
	}
	k := AgentKey{Town: "t", Agent: "a"}
	b.ResetTimer()
	for b.Loop() {
		evs, err := s.After(ctx, k, 0, 2000)
		if err != nil || len(evs) != 2000 {
			b.Fatalf("%d events, %v", len(evs), err)
		}
	}
}
