package server

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/agentstream/agentstream/model"
)

// Token scopes.
const (
	ScopeAgent  = "agent"  // may post events as its sub, in its rig and town
	ScopeViewer = "viewer" // may read every agent of its town
)

// Claims is what an agentstream token says about its bearer.
type Claims struct {
	Scope string `json:"scope"`
	Town  string `json:"town"`
	Rig   string `json:"rig,omitempty"`
	jwt.RegisteredClaims
}

// Auth mints and verifies the server's HS256 tokens.
type Auth struct {
	key []byte
}

// MinSecretLen is the shortest signing secret accepted, in bytes.
const MinSecretLen = 32

// NewAuth returns an Auth for secret, which must be at least MinSecretLen
// bytes.
func NewAuth(secret []byte) (*Auth, error) {
	if len(secret) < 32 {
		return nil, fmt.Errorf("secret is %d bytes; at least 32 are needed", len(secret))
	}
	return &Auth{key: secret}, nil
}

// MintAgent returns a token that lets agent post events in rig of town.
func (a *Auth) MintAgent(town, rig, agent string, ttl time.Duration) (string, error) {
	if town == "" || rig == "" || agent == "" {
		return "", errors.New("an agent token needs a town, a rig and an agent")
	}
	if err := checkClaimIDs("town", town, "rig", rig, "agent", agent); err != nil {
		return "", err
	}
	return a.mint(Claims{Scope: ScopeAgent, Town: town, Rig: rig, RegisteredClaims: jwt.RegisteredClaims{Subject: agent}}, ttl)
}

// MintViewer returns a token that lets its bearer watch every agent of town.
func (a *Auth) MintViewer(town string, ttl time.Duration) (string, error) {
	if town == "" {
		return "", errors.New("a viewer token needs a town")
	}
	if err := checkClaimIDs("town", town); err != nil {
		return "", err
	}
	return a.mint(Claims{Scope: ScopeViewer, Town: town}, ttl)
}

func (a *Auth) mint(c Claims, ttl time.Duration) (string, error) {
	if ttl <= 0 {
		return "", errors.New("token lifetime must be positive")
	}
	now := time.Now()
	c.IssuedAt = jwt.NewNumericDate(now)
	c.ExpiresAt = jwt.NewNumericDate(now.Add(ttl))
	return jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(a.key)
}

// maxIssuedAhead is how far in the future a token's iat may be: clocks of
// the machines that mint and verify may differ a little, but a token
// "issued" later than this was not made by an honest minter.
const maxIssuedAhead = time.Minute

// Verify checks a token's signature (HS256 only: "none" and every other
// algorithm are refused), requires an unexpired exp and an iat, if any, not
// more than a minute ahead, and checks that the claims fit the scope and
// name valid ids.
func (a *Auth) Verify(token string) (*Claims, error) {
	var c Claims
	_, err := jwt.ParseWithClaims(token, &c, func(*jwt.Token) (any, error) { return a.key, nil },
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithExpirationRequired(),
		jwt.WithLeeway(5*time.Second),
	)
	if err != nil {
		return nil, err
	}
	if c.IssuedAt != nil && c.IssuedAt.After(time.Now().Add(maxIssuedAhead)) {
		return nil, errors.New("token is issued in the future (iat)")
	}
	switch c.Scope {
	case ScopeAgent:
		if c.Subject == "" || c.Rig == "" || c.Town == "" {
			return nil, errors.New("agent token lacks sub, rig or town")
		}
		err = checkClaimIDs("town", c.Town, "rig", c.Rig, "agent", c.Subject)
	case ScopeViewer:
		if c.Town == "" {
			return nil, errors.New("viewer token lacks town")
		}
		err = checkClaimIDs("town", c.Town)
	default:
		return nil, fmt.Errorf("unknown scope %q", c.Scope)
	}
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// checkClaimIDs checks ids, given as name, value pairs, by model.CheckID.
func checkClaimIDs(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		if msg := model.CheckID(pairs[i], pairs[i+1]); msg != "" {
			return errors.New(strings.TrimSuffix(msg, "."))
		}
	}
	return nil
}

// authenticate reads the Bearer token of r.
func (a *Auth) authenticate(r *http.Request) (*Claims, *apiError) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return nil, errorf(http.StatusUnauthorized, "missing_token", "An Authorization: Bearer token is required.")
	}
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
		return nil, errorf(http.StatusUnauthorized, "invalid_token", "The Authorization header must be \"Bearer <token>\".")
	}
	c, err := a.Verify(strings.TrimSpace(tok))
	if errors.Is(err, jwt.ErrTokenExpired) {
		return nil, errorf(http.StatusUnauthorized, "token_expired", "The token has expired; mint a new one.")
	}
	if errors.Is(err, jwt.ErrTokenSignatureInvalid) {
		return nil, errorf(http.StatusUnauthorized, "invalid_token", "The token's signature is invalid: it was likely minted "+
			"with another secret than this server's (another --data directory, --secret-file or AGENTSTREAM_SECRET), or altered.")
	}
	if err != nil {
		return nil, errorf(http.StatusUnauthorized, "invalid_token", "The token is not valid: "+err.Error()+".")
	}
	return c, nil
}

// ErrNoSecret is ReadSecret's error when the data directory holds no
// secret.
var ErrNoSecret = errors.New("no secret")

// ReadSecret returns AGENTSTREAM_SECRET (env) if set, else the secret in
// dir, and never makes one: the commands that mint tokens for a server
// (token, tail, run, emit) use it, so that a mistyped --data is an error
// that names the path rather than a new secret no server knows.
func ReadSecret(env, dir string) ([]byte, error) {
	if env != "" {
		if len(env) < 32 {
			return nil, fmt.Errorf("AGENTSTREAM_SECRET is %d bytes; at least 32 are needed (openssl rand -hex 32 makes one)", len(env))
		}
		return []byte(env), nil
	}
	path := filepath.Join(dir, "secret")
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w at %s: the server makes it when it first starts with --data %s; "+
			"give the same --data as the server, or --token, or its AGENTSTREAM_SECRET", ErrNoSecret, path, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read secret: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if len(s) < 32 {
		return nil, fmt.Errorf("secret in %s is too short; delete it to generate a new one", path)
	}
	return []byte(s), nil
}

// LoadSecret returns the server secret: env when set, else the one stored in
// dir/secret, generated there (mode 0600) on first use; only serve calls
// it. The file is what lets `agentstream token --data DIR` mint tokens a
// server on DIR accepts.
//
// A new secret is written durably — a temporary file, fsynced, linked into
// place, and the directory fsynced — so that a crash or a power cut leaves
// either no secret or the whole one, never an empty file. And none is
// generated into a directory that already holds a database: that database's
// tokens were minted with a secret that is lost, and a new one would
// silently make every one of them invalid.
func LoadSecret(env, dir string) ([]byte, error) {
	secret, err := ReadSecret(env, dir)
	if !errors.Is(err, ErrNoSecret) {
		return secret, err
	}
	path := filepath.Join(dir, "secret")
	if _, err := os.Stat(filepath.Join(dir, DBFile)); err == nil {
		return nil, fmt.Errorf("%s holds a database but no secret (%s): the tokens of that database were signed with it. "+
			"Put the secret back, or set AGENTSTREAM_SECRET to it; to start over with a new secret, move %s away first",
			dir, path, DBFile)
	}
	if err := mkdirDurable(dir); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	raw := make([]byte, 32)
	rand.Read(raw)
	s := hex.EncodeToString(raw)
	// Write a temp file, then link it into place: the link fails if another
	// process (serve and token started together) got there first, and then
	// we read theirs; nobody ever reads a half-written secret.
	tmp, err := os.CreateTemp(dir, ".secret-*")
	if err != nil {
		return nil, fmt.Errorf("write secret: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(s + "\n"); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write secret: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write secret: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("write secret: %w", err)
	}
	// CreateTemp makes the file 0600 already.
	if err := os.Link(tmp.Name(), path); errors.Is(err, os.ErrExist) {
		return LoadSecret("", dir)
	} else if err != nil {
		return nil, fmt.Errorf("write secret: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return nil, fmt.Errorf("write secret: %w", err)
	}
	return []byte(s), nil
}

// ReadSecretFile reads a signing secret kept in a file of its own (for
// several instances that must share it): its text, trimmed, at least 32
// bytes.
func ReadSecretFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--secret-file: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if len(s) < 32 {
		return nil, fmt.Errorf("--secret-file %s holds %d bytes; at least 32 are needed (openssl rand -hex 32 makes one)", path, len(s))
	}
	return []byte(s), nil
}

// DBFile is the SQLite file's name in the data directory.
const DBFile = "agentstream.db"

// mkdirDurable creates dir (mode 0700) and any parents missing, and fsyncs
// the parent of each directory it made, so the directory survives a crash
// with the files fsynced into it.
func mkdirDurable(dir string) error {
	dir = filepath.Clean(dir)
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := mkdirDurable(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return syncDir(filepath.Dir(dir))
}

// syncDir fsyncs a directory, making the names in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
