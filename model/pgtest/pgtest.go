// Package pgtest runs a throwaway PostgreSQL cluster for tests: initdb into
// a temporary directory, then postgres on a free loopback port with its
// socket in that directory, and a fresh database for each test.
//
// PostgreSQL refuses to run as root. When the tests run as root (as CI
// does), the cluster runs as the "postgres" user that Debian's package
// creates, through runuser.
package pgtest

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
)

// ErrNoPostgres is Start's error when no PostgreSQL server binaries are
// installed.
var ErrNoPostgres = errors.New("pgtest: no PostgreSQL server found (apt-get install postgresql)")

// Cluster is a running PostgreSQL server of the tests' own.
type Cluster struct {
	dir     string // holds the data directory and the socket
	port    int
	command func(name string, args ...string) *exec.Cmd
	cmd     *exec.Cmd
	done    chan struct{}
	seq     atomic.Int64
}

// binDir finds the server binaries: Debian keeps them out of PATH, in
// /usr/lib/postgresql/VERSION/bin.
func binDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Strings(dirs)
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "postgres")); err == nil {
			return dirs[i], nil
		}
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", ErrNoPostgres
}

// Start initializes and starts a cluster. Stop it with Stop.
func Start() (*Cluster, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "agentstream-pg-")
	if err != nil {
		return nil, err
	}
	data := filepath.Join(dir, "data")
	var asUser []string
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("pgtest: running as root needs the postgres user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, err
		}
		if err := os.Mkdir(data, 0o700); err != nil {
			return nil, err
		}
		if err := os.Chown(data, uid, gid); err != nil {
			return nil, err
		}
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, err
		}
		asUser = []string{"runuser", "-u", "postgres", "--"}
	}
	command := func(name string, args ...string) *exec.Cmd {
		argv := append(append(append([]string(nil), asUser...), filepath.Join(bin, name)), args...)
		return exec.Command(argv[0], argv[1:]...)
	}
	out, err := command("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync").CombinedOutput()
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgtest: initdb: %w: %s", err, out)
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	c := &Cluster{dir: dir, port: port, command: command}
	if err := c.Up(); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// Up starts the server on the cluster's data and port, and waits until
// it answers.
func (c *Cluster) Up() error {
	// Durability is not under test here: the server's own crash safety
	// holds without fsync as long as the machine does not crash.
	c.cmd = c.command("postgres", "-D", filepath.Join(c.dir, "data"), "-p", strconv.Itoa(c.port), "-k", c.dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
		"-c", "full_page_writes=off", "-c", "max_connections=300")
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	logf, err := os.OpenFile(filepath.Join(c.dir, "postgres.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err == nil {
		c.cmd.Stdout, c.cmd.Stderr = logf, logf
	}
	c.done = make(chan struct{})
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("pgtest: postgres: %w", err)
	}
	done := c.done
	go func() { c.cmd.Wait(); close(done) }()
	return c.waitReady(60 * time.Second)
}

// Down stops the server, keeping its data, as an operator's restart does
// (a fast shutdown: open transactions are rolled back, connections cut).
func (c *Cluster) Down() {
	c.signal(syscall.SIGINT)
}

func (c *Cluster) signal(sig syscall.Signal) {
	if c.cmd == nil || c.cmd.Process == nil {
		return
	}
	syscall.Kill(-c.cmd.Process.Pid, sig)
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		<-c.done
	}
}

func (c *Cluster) waitReady(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		db, err := sql.Open("pgx", c.DSN("postgres"))
		if err == nil {
			err = db.Ping()
			db.Close()
		}
		if err == nil {
			return nil
		}
		select {
		case <-c.done:
			log, _ := os.ReadFile(filepath.Join(c.dir, "postgres.log"))
			return fmt.Errorf("pgtest: postgres exited: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pgtest: postgres not ready after %s: %w", limit, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// DSN is the URL of database name on the cluster.
func (c *Cluster) DSN(name string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.port, name)
}

// NewDatabase creates an empty database and returns its URL.
func (c *Cluster) NewDatabase(ctx context.Context) (string, error) {
	name := fmt.Sprintf("test_%d_%d", os.Getpid(), c.seq.Add(1))
	db, err := sql.Open("pgx", c.DSN("postgres"))
	if err != nil {
		return "", err
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		return "", fmt.Errorf("pgtest: create database: %w", err)
	}
	return c.DSN(name), nil
}

// Stop ends the server and removes its files.
func (c *Cluster) Stop() {
	// SIGQUIT: immediate shutdown; the cluster is thrown away.
	c.signal(syscall.SIGQUIT)
	os.RemoveAll(c.dir)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Skip reports how a test should treat a cluster that could not start: in
// CI (CI=true) that is a failure, elsewhere a skip with the reason.
func Skip(err error) (fail bool, msg string) {
	msg = "PostgreSQL tests: " + err.Error()
	return strings.EqualFold(os.Getenv("CI"), "true"), msg
}

// Backend is a database a package's tests run against: its name, and how
// to make a fresh, empty one for a test (a SQLite path or a PostgreSQL URL).
type Backend struct {
	Name string
	DSN  func(t testing.TB) string
	// Cluster is the PostgreSQL server behind DSN; nil on SQLite. Tests
	// of several instances on one database, or of a database restart,
	// use it.
	Cluster *Cluster
}

// BackendsEnv names the environment variable that narrows RunEach to some
// backends: a comma-separated list of names ("sqlite", "postgres"). Unset
// or empty means all of them.
const BackendsEnv = "AGENTSTREAM_TEST_BACKENDS"

// RunEach runs a package's tests once per backend — SQLite, then
// PostgreSQL on a cluster of its own — with *current set to the backend
// of the run, and returns the exit code for os.Exit. Without PostgreSQL
// it runs SQLite only, or fails in CI (see Skip). BackendsEnv narrows
// the list. Fuzzing runs on SQLite only: the fuzzed parsers never reach
// the database, and each fuzz worker process would start a cluster.
func RunEach(m *testing.M, current *Backend) int {
	flag.Parse()
	fuzzing := flag.Lookup("test.fuzz").Value.String() != "" || flag.Lookup("test.fuzzworker").Value.String() == "true"
	want := func(name string) bool {
		if fuzzing {
			return name == "sqlite"
		}
		list := os.Getenv(BackendsEnv)
		return list == "" || slices.Contains(strings.Split(list, ","), name)
	}
	var backends []Backend
	if want("sqlite") {
		backends = append(backends, Backend{Name: "sqlite", DSN: func(t testing.TB) string {
			return filepath.Join(t.TempDir(), "agentstream.db")
		}})
	}
	if !want("postgres") {
		return runAll(m, current, backends)
	}
	cluster, err := Start()
	if err != nil {
		fail, msg := Skip(err)
		fmt.Fprintln(os.Stderr, msg)
		if fail {
			return 1
		}
	} else {
		defer cluster.Stop()
		backends = append(backends, Backend{Name: "postgres", Cluster: cluster, DSN: func(t testing.TB) string {
			dsn, err := cluster.NewDatabase(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			return dsn
		}})
	}
	return runAll(m, current, backends)
}

func runAll(m *testing.M, current *Backend, backends []Backend) int {
	if len(backends) == 0 {
		fmt.Fprintf(os.Stderr, "%s=%q names no backend: use sqlite, postgres or both\n", BackendsEnv, os.Getenv(BackendsEnv))
		return 2
	}
	code := 0
	for _, b := range backends {
		*current = b
		fmt.Printf("=== backend %s\n", b.Name)
		if c := m.Run(); c != 0 {
			code = c
		}
	}
	return code
}
