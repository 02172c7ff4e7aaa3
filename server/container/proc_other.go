//go:build !unix

package container

import (
	"os"
	"syscall"
)

// groupAttr is nil where there are no process groups: only the agent's own
// process is signalled.
func groupAttr() *syscall.SysProcAttr { return nil }

func signalGroup(pid int, sig syscall.Signal) {
	if p, err := os.FindProcess(pid); err == nil {
		p.Kill()
	}
}
