package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// selfSigned makes a certificate for 127.0.0.1 and its key, and a pool
// that trusts it.
func selfSigned(t testing.TB) (*x509.Certificate, *ecdsa.PrivateKey, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return cert, key, pool
}

// writeCert writes a self-signed certificate for 127.0.0.1 and its key as
// PEM files in dir, and returns their paths and a pool that trusts it.
func writeCert(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	cert, key, pool := selfSigned(t)
	kder, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, pool
}

// TestServeTLSFiles: a missing or unreadable certificate or key stops serve
// with an error naming its flag, before it listens (no "listening" line);
// a good pair serves HTTPS, HTTP/2 by ALPN.
func TestServeTLSFiles(t *testing.T) {
	onlySQLite(t) // serve's own start, not the database
	dir := t.TempDir()
	certFile, keyFile, pool := writeCert(t, dir)
	missing := filepath.Join(dir, "missing.pem")
	for _, tc := range []struct{ cert, key, want string }{
		{missing, keyFile, "--tls-cert: open " + missing},
		{certFile, missing, "--tls-key: open " + missing},
		{keyFile, certFile, "--tls-cert " + keyFile + " and --tls-key " + certFile + ": tls:"},
	} {
		var logs strings.Builder
		err := Serve(context.Background(), Config{Addr: "127.0.0.1:0", DataDir: t.TempDir(), TLSCert: tc.cert, TLSKey: tc.key,
			Log: slog.New(slog.NewTextHandler(&logs, nil))})
		if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("cert %s, key %s: %v, want an error starting %q", filepath.Base(tc.cert), filepath.Base(tc.key), err, tc.want)
		}
		if strings.Contains(logs.String(), "listening") {
			t.Errorf("serve logged listening before failing: %s", logs.String())
		}
	}

	ctx, stop := context.WithCancel(context.Background())
	ready := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, Config{Addr: "127.0.0.1:0", DataDir: t.TempDir(), TLSCert: certFile, TLSKey: keyFile,
			Log: slog.New(slog.DiscardHandler), Ready: func(a net.Addr) { ready <- a }})
	}()
	var addr net.Addr
	select {
	case addr = <-ready:
	case err := <-done:
		t.Fatalf("serve: %v", err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("https://" + addr.String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Proto != "HTTP/2.0" {
		t.Fatalf("GET /healthz over TLS: %d %s, want 200 over HTTP/2", resp.StatusCode, resp.Proto)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
