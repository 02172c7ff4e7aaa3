#!/usr/bin/env bash
# h2variants.sh: SSE over HTTP/2 beside SSE over HTTP/1.1, with the shared
# harness's streambench, every variant interleaved, REPS times: h2c with a
# connection per stream and with 50 streams a connection, HTTP/2 over TLS,
# each on agentstream's own HTTP/2 server and on net/http's (--net-http2).
# Run from the project's root; prints streambench's lines to $OUT and a
# summary of medians.
# Env: BIN (default: built here), REPS (3), SUBS (5000), EVENTS (200), RATE (10), OUT,
# VARIANTS (a space-separated subset of the variants below).
set -u
out=${OUT:-${TMPDIR:-/tmp}/h2variants.txt}; work=$(mktemp -d)
bin=${BIN:-}
if [ -z "$bin" ]; then CGO_ENABLED=0 go build -o "$work/agentstream" . || exit 1; bin=$work/agentstream; fi
(cd ../shared/bench/streambench && go build -o "$work/streambench" .) || exit 1
(cd "$work" && go run "$(go env GOROOT)/src/crypto/tls/generate_cert.go" --host 127.0.0.1 --ecdsa-curve P256 >/dev/null 2>&1) || exit 1
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
secret=bench-secret-0123456789abcdef0123456789abcdef
jwt() { python3 - "$secret" "$1" <<'PY'
import base64,hmac,hashlib,json,sys,time
b=lambda o: base64.urlsafe_b64encode(json.dumps(o,separators=(",",":")).encode()).rstrip(b"=").decode()
c=json.loads(sys.argv[2]); c["exp"]=int(time.time())+3600
h=b({"alg":"HS256","typ":"JWT"}); p=b(c)
print(f"{h}.{p}."+base64.urlsafe_b64encode(hmac.new(sys.argv[1].encode(),f"{h}.{p}".encode(),hashlib.sha256).digest()).rstrip(b"=").decode())
PY
}
vt=$(jwt '{"town":"bench","scope":"viewer"}')
at=$(jwt '{"sub":"bench-agent","rig":"r","town":"bench","scope":"agent"}')
: > "$out"
for rep in $(seq 1 "${REPS:-3}"); do
  for v in ${VARIANTS:-sse-h1 h2c-own-1 h2c-own-50 h2c-net-1 h2c-net-50 h2tls-own-1 h2tls-net-1}; do
    IFS=- read -r proto server per <<<"$v"
    data=$(mktemp -d); port=18097; extra=(); scheme=http; sproto=$proto
    [ "$proto" = sse ] && sproto=h1
    [ "$proto" = h2tls ] && { extra=(--tls-cert "$work/cert.pem" --tls-key "$work/key.pem"); scheme=https; sproto=h2; }
    [ "$server" = net ] && extra+=(--net-http2)
    h2s=(); [ -n "$per" ] && h2s=(-h2-streams "$per")
    AGENTSTREAM_SECRET=$secret "$bin" serve --addr 127.0.0.1:$port --data "$data" "${extra[@]}" >"$data.log" 2>&1 & pid=$!
    for i in $(seq 1 100); do curl -sk -o /dev/null "$scheme://127.0.0.1:$port/readyz" && break; sleep 0.1; done
    echo "# rep=$rep $v $(date +%T)" >&2
    "$work/streambench" -label "$v" -transport sse -proto "$sproto" "${h2s[@]}" -insecure \
      -subs "${SUBS:-5000}" -events "${EVENTS:-200}" -rate "${RATE:-10}" -timeout 300s \
      -sub-url "$scheme://127.0.0.1:$port/api/towns/bench/container/agents/bench-agent/stream" \
      -sub-header "Authorization: Bearer $vt" \
      -pub "$scheme://127.0.0.1:$port/api/rigs/r/agent-events" -pub-header "Authorization: Bearer $at" \
      -pub-body '{"agent_id":"bench-agent","type":"bench","data":{"ts":{ts},"seq":{seq}}}' \
      -payload-path data.ts -server-pid $pid 2>/dev/null | tail -n 1 >>"$out"
    kill $pid; wait $pid 2>/dev/null; rm -rf "$data" "$data.log"
  done
done
rm -rf "$work"
python3 - "$out" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    if f:
        rows[f[0]].append(dict(p.split("=", 1) for p in f[1:] if "=" in p))
base = rows.get("sse-h1")
med = lambda v, k: statistics.median(float(x[k]) for x in v)
print(f"{'variant':12} {'n':>2} {'lost':>4} {'dup':>3} {'p99 ms':>7} {'ratio':>5} {'deliv/CPU-s':>11} {'ratio':>5} {'KiB/idle':>8}")
for k, v in rows.items():
    print(f"{k:12} {len(v):2} {sum(int(x['lost']) for x in v):4} {sum(int(x['dup']) for x in v):3} "
          f"{med(v,'p99_ms'):7.1f} {med(v,'p99_ms')/med(base,'p99_ms'):5.2f} "
          f"{med(v,'deliveries_per_cpu_s'):11.0f} {med(v,'deliveries_per_cpu_s')/med(base,'deliveries_per_cpu_s'):5.2f} "
          f"{med(v,'rss_per_idle_sub_b')/1024:8.1f}")
PY
