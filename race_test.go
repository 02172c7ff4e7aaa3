//go:build race

package main

// raceEnabled: the test binary was built with -race, so the binary the
// tests build is too, and reuses its cached packages.
const raceEnabled = true
