#!/usr/bin/env bash
# Soak (issue 11): `imgcache serve` (release build) against a local nginx origin, driven by wrk
# with 200 connections of mixed hits, misses and Range requests for DURATION seconds.
#
#   bench/soak.sh [DURATION_SECONDS]     (default 600; PORT=18280 base port, CONNS=200)
#
# Two wrk runs at once, both against imgcache's /v1/fetch:
#   hits    CONNS-20 connections over 20 cached images (256 KiB each, warmed first); one request
#           in four a Range (bytes=A-B) of it. Its p50/p99 latency is the hit latency reported.
#   misses  20 connections, each request a new href (/m/<thread>-<n>.img, 64 KiB from nginx):
#           a download, an admission and a publish per request; the pruner keeps the cache
#           under --max-size 256M.
# Checks, each printed: 0 errors (socket errors and non-2xx/206 answers, from wrk's summary),
# RSS sampled every 10 s (first, last, max), open file descriptors before and after (no
# leak: at most 10 more once the load is gone), and RSS flat after warm-up (the last third's
# peak within 10 % of the middle third's). Exit 1 when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-600}
CONNS=${CONNS:-200}
BASE=${PORT:-18280}
P_ORIGIN=$((BASE + 1)) P_IMG=$((BASE + 2))
WORK=$(mktemp -d /tmp/imgcache-soak.XXXXXX)
IMG_PID= SAMPLER=
cleanup() {
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null
  [ -n "$IMG_PID" ] && kill "$IMG_PID" 2>/dev/null && wait "$IMG_PID" 2>/dev/null
  [ -f "$WORK/origin.pid" ] && kill "$(cat "$WORK/origin.pid")" 2>/dev/null
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v bc >/dev/null || need+=(bc)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release -q -p imgcache
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/imgcache

chmod 755 "$WORK" # nginx's workers run unprivileged
mkdir -p "$WORK/www/hit" "$WORK/logs" "$WORK/cache"
for i in $(seq 1 20); do head -c $((256 << 10)) /dev/urandom > "$WORK/www/hit/$i.img"; done
head -c $((64 << 10)) /dev/urandom > "$WORK/www/miss.img"
cat > "$WORK/origin.conf" <<NGINX
worker_processes 1;
pid $WORK/origin.pid; error_log $WORK/logs/error.log;
events { worker_connections 4096; }
http { access_log off; sendfile on;
  client_body_temp_path $WORK/logs; proxy_temp_path $WORK/logs; fastcgi_temp_path $WORK/logs;
  uwsgi_temp_path $WORK/logs; scgi_temp_path $WORK/logs;
  server { listen 127.0.0.1:$P_ORIGIN; root $WORK/www;
    location /m/ { rewrite ^ /miss.img break; }
  }
}
NGINX
nginx -c "$WORK/origin.conf" -p "$WORK"
for _ in $(seq 50); do [ -s "$WORK/origin.pid" ] && break; sleep 0.1; done
ORIGIN=http://127.0.0.1:$P_ORIGIN
"$BIN" --cache-dir "$WORK/cache" serve --listen "127.0.0.1:$P_IMG" --allow-href-prefix "$ORIGIN/" \
  --max-size 256M 2> "$WORK/logs/imgcache.log" > /dev/null &
IMG_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$P_IMG/healthz" >/dev/null && break; sleep 0.1; done
for i in $(seq 1 20); do # warm: every hit image cached (and its bytes right)
  curl -sf "http://127.0.0.1:$P_IMG/v1/fetch?href=$ORIGIN/hit/$i.img" | cmp -s - "$WORK/www/hit/$i.img" ||
    { echo "warm-up: wrong bytes for hit/$i.img" >&2; exit 1; }
done
fds() { ls "/proc/$IMG_PID/fd" | wc -l; }
# Idle keep-alive connections imgcache's HTTP client pools to the origin (bounded, reused,
# closed after the client's idle timeout): not a leak, so counted apart.
pooled() { ss -Htn state established "( dport = :$P_ORIGIN )" 2>/dev/null | wc -l; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$IMG_PID/status"; }
threads() { awk '/^Threads/ {print $2}' "/proc/$IMG_PID/status"; }
FD_BEFORE=$(fds) # after the warm-up: the runtime's and the store's own descriptors are open

cat > "$WORK/common.lua" <<'LUA'
local counter = 1
function setup(thread) thread:set("id", counter); counter = counter + 1 end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n",
    summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
LUA
cat "$WORK/common.lua" - > "$WORK/hits.lua" <<LUA
local origin = "$ORIGIN"
local n = 0
function request()
  n = n + 1
  local i = (n * 7 + id) % 20 + 1
  local path = "/v1/fetch?href=" .. origin .. "/hit/" .. i .. ".img"
  if n % 4 == 0 then
    local a = (n * 4099) % 200000
    return wrk.format("GET", path, { ["Range"] = "bytes=" .. a .. "-" .. (a + 16383) })
  end
  return wrk.format("GET", path)
end
LUA
cat "$WORK/common.lua" - > "$WORK/misses.lua" <<LUA
local origin = "$ORIGIN"
local n = 0
function request()
  n = n + 1
  return wrk.format("GET", "/v1/fetch?href=" .. origin .. "/m/" .. id .. "-" .. n .. ".img")
end
LUA

RSS_LOG=$WORK/rss.log
(while kill -0 "$IMG_PID" 2>/dev/null; do echo "$(date +%s) $(rss) $(threads)" >> "$RSS_LOG"; sleep 10; done) &
SAMPLER=$!
echo "==> soak: ${DURATION}s, $CONNS connections ($((CONNS - 20)) hits/ranges, 20 misses)"
wrk -t2 -c$((CONNS - 20)) -d"${DURATION}s" --timeout 10s -s "$WORK/hits.lua" "http://127.0.0.1:$P_IMG" > "$WORK/hits.out" 2>&1 &
W1=$!
wrk -t1 -c20 -d"${DURATION}s" --timeout 10s -s "$WORK/misses.lua" "http://127.0.0.1:$P_IMG" > "$WORK/misses.out" 2>&1 &
W2=$!
wait $W1 $W2
sleep 3 # let the last fills and the pruner settle
echo "$(date +%s) $(rss) $(threads)" >> "$RSS_LOG"
kill "$SAMPLER" 2>/dev/null; SAMPLER=
FD_AFTER=$(fds) POOLED=$(pooled)

fail=0
field() { grep -o "$2=[0-9.]*" "$1" | cut -d= -f2; }
for part in hits misses; do
  out=$WORK/$part.out
  if ! grep -q '^RESULT' "$out"; then echo "$part: wrk failed:"; cat "$out"; fail=1; continue; fi
  errs=0
  for k in connect read write status timeout; do errs=$((errs + $(field "$out" $k))); done
  reqs=$(field "$out" requests)
  printf '%-6s requests %d (%.0f/s), errors %d (connect %s read %s write %s status %s timeout %s), p50 %s ms, p99 %s ms, max %s ms\n' \
    "$part" "$reqs" "$(echo "$reqs / $DURATION" | bc -l)" "$errs" "$(field "$out" connect)" "$(field "$out" read)" \
    "$(field "$out" write)" "$(field "$out" status)" "$(field "$out" timeout)" "$(field "$out" p50_ms)" \
    "$(field "$out" p99_ms)" "$(field "$out" max_ms)"
  [ "$errs" -eq 0 ] || fail=1
done
first=$(head -n1 "$RSS_LOG" | cut -d' ' -f2) last=$(tail -n1 "$RSS_LOG" | cut -d' ' -f2)
max=$(cut -d' ' -f2 "$RSS_LOG" | sort -n | tail -n1)
n=$(wc -l < "$RSS_LOG")
echo "rss: first $((first / 1024)) MiB, last $((last / 1024)) MiB, max $((max / 1024)) MiB ($n samples, every 10 s)"
echo "rss samples (MiB): $(awk '{printf "%d ", $2 / 1024}' "$RSS_LOG")"
echo "thread samples: $(awk '{printf "%d ", $3}' "$RSS_LOG")"
# Flat: once warmed up (the first third of the run: connection buffers, allocator arenas, the
# page cache of the database), the last third's peak is no more than 10 % (and 8 MiB) above
# the middle third's. A leak keeps climbing; a working set levels off.
if [ "$n" -ge 6 ]; then
  third=$((n / 3))
  mid=$(sed -n "$((third + 1)),$((2 * third))p" "$RSS_LOG" | cut -d' ' -f2 | sort -n | tail -n1)
  end=$(tail -n "$third" "$RSS_LOG" | cut -d' ' -f2 | sort -n | tail -n1)
  echo "rss steady state: middle third peak $((mid / 1024)) MiB, last third peak $((end / 1024)) MiB"
  [ "$end" -le $((mid + mid / 10 + 8192)) ] || { echo "rss keeps growing after warm-up"; fail=1; }
fi
echo "fds: before $FD_BEFORE, after $FD_AFTER (of which $POOLED pooled origin connections)"
[ $((FD_AFTER - POOLED)) -le $((FD_BEFORE + 10)) ] || { echo "fd leak: $FD_BEFORE -> $FD_AFTER"; fail=1; }
echo "hit latency: p50 $(field "$WORK/hits.out" p50_ms) ms, p99 $(field "$WORK/hits.out" p99_ms) ms"
cached=$("$BIN" --cache-dir "$WORK/cache" list --json | grep -c '"image_id"' || true)
echo "cache: $cached images after the run; imgcache log: $(grep -c ' ERROR ' "$WORK/logs/imgcache.log" || true) errors"
[ "$fail" -eq 0 ] && echo "soak: ok" || { echo "soak: FAILED"; exit 1; }
