//go:build unix

package container

import "syscall"

// groupAttr puts an agent in a process group of its own, so that stopping it
// reaches every process it started.
func groupAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }

// signalGroup sends sig to the process group led by pid. A group that is
// gone already is not an error.
func signalGroup(pid int, sig syscall.Signal) {
	syscall.Kill(-pid, sig)
}
