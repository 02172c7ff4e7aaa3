//go:build !linux

package transport

import (
	"errors"
	"net"
)

// Poller is Linux-only (epoll). Elsewhere NewPoller fails and streams read
// their clients on a goroutine each.
type Poller struct{}

// Watch is a connection watched by a Poller.
type Watch struct{}

// NewPoller fails with errors.ErrUnsupported on this system.
func NewPoller() (*Poller, error) { return nil, errors.ErrUnsupported }

func (p *Poller) Close() error { return nil }

func (p *Poller) Watch(net.Conn, func()) (*Watch, error) { return nil, errors.ErrUnsupported }

func (w *Watch) Arm() error { return errors.ErrUnsupported }

func (w *Watch) Stop() {}
