package poll

import (
	"sync"

	"github.com/agentstream/agentstream/model"
)

// Format names a wire encoding of events (SSE, WebSocket, NDJSON, ...). The
// transport assigns the numbers; poll only keeps one cache slot per format.
type Format uint8

// MaxFormats is how many formats an Item can cache.
const MaxFormats = 4

// Item is one event as the scheduler hands it out. Every live subscriber of
// an agent receives the same *Item, so an encoding computed through Encoded
// is computed once per event and format, however many subscribers write it.
// Items are read-only once handed out.
type Item struct {
	model.Event
	enc [MaxFormats]encoding
}

type encoding struct {
	once sync.Once
	b    []byte
}

// Encoded returns the event in format f, calling encode the first time only.
// encode must be the same function for a given format everywhere.
func (it *Item) Encoded(f Format, encode func(*model.Event) []byte) []byte {
	e := &it.enc[f]
	e.once.Do(func() { e.b = encode(&it.Event) })
	return e.b
}
