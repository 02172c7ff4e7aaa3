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

// Cost is what an Item is taken to hold in memory, for the byte budgets of
// streams and rings: the event's data, about as much again for the frame
// of the one format most streams write it in, and the Item itself.
func (it *Item) Cost() int64 { return eventCost(&it.Event) }

func eventCost(ev *model.Event) int64 { return int64(2*len(ev.Data)+len(ev.Type)) + itemOverhead }

const itemOverhead = 512

// blockBytes bounds the events' data in one block of Items (see itemsFor).
const blockBytes = 64 << 10

// itemsFor wraps events in Items and appends them to dst. Items are
// allocated in blocks, one allocation for many small events; but an Item
// kept alive keeps its whole block alive, and every event of it, so a
// block holds at most blockBytes of data: a stream that holds one large
// event holds no more than that.
func itemsFor(dst []*Item, evs []model.Event) []*Item {
	for len(evs) > 0 {
		n, size := 0, 0
		for n < len(evs) && (n == 0 || size+len(evs[n].Data) <= blockBytes) {
			size += len(evs[n].Data)
			n++
		}
		block := make([]Item, n)
		for i := range block {
			block[i].Event = evs[i]
			dst = append(dst, &block[i])
		}
		evs = evs[n:]
	}
	return dst
}
