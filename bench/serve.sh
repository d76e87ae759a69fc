#!/usr/bin/env bash
# Service benchmark (issue 5): `imgcache serve` against nginx, on loopback, ratios from one run.
#
#   bench/serve.sh [SIZE_MIB]      (default 1024; ROUNDS=3 hit rounds, PORT=18180 base port,
#                                   PARTS="miss hit stampede rss" to run only some parts)
#
# Four roles, each its own process so CPU is attributed cleanly:
#   origin   nginx: a fake Glance (/v2/images/ID -> JSON record with the sha256, /v2/images/ID/file
#            -> the image; ids starting with 5 are throttled with limit_rate 100m), access log on
#   static   nginx `sendfile on; tcp_nopush off;` serving the same image file (the hit baseline)
#   proxy    nginx proxy_cache in front of the origin (the miss baseline; verifies nothing)
#   imgcache target/release/imgcache serve --glance-url origin
# Reports:
#   hit       1 and 8 concurrent `curl -o /dev/null`: GB/s (all clients' bytes / wall) and server
#             CPU-seconds per GiB (utime+stime from /proc/PID/stat, nginx: its workers), median of
#             ROUNDS rounds; imgcache/nginx ratios
#   miss      cold miss through imgcache (sha256 verified before the last byte goes out) vs the
#             slower of curl from the origin and `openssl dgst -sha256` on the file, and vs an
#             nginx proxy_cache miss
#   stampede  1, 16 and 64 clients on one uncached image from the throttled origin: origin data
#             requests (access log), time to first byte (min/median/max; curl's
#             time_starttransfer, each from its own start), total wall vs one client alone, and
#             the floor: nginx serving the finished file to as many clients, unpaced (no server
#             can deliver N GiB to N curls faster on this machine)
#   rss       peak RSS (VmHWM, reset with clear_refs first) of imgcache serving 8 clients a miss
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
ROUNDS=${ROUNDS:-3}
BASE=${PORT:-18180}
P_ORIGIN=$((BASE + 1)) P_STATIC=$((BASE + 2)) P_PROXY=$((BASE + 3)) P_IMG=$((BASE + 4))
WORK=$(mktemp -d /tmp/imgcache-serve-bench.XXXXXX)
IMG_PID=
cleanup() {
  [ -n "$IMG_PID" ] && kill "$IMG_PID" 2>/dev/null && wait "$IMG_PID" 2>/dev/null
  for n in origin static proxy; do
    [ -f "$WORK/$n.pid" ] && kill "$(cat "$WORK/$n.pid")" 2>/dev/null
  done
  sleep 0.3
  rm -rf "$WORK"
  sync # ext4 with discard: the deletes cost their discards now, not in the next run
}
trap cleanup EXIT

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v bc >/dev/null || need+=(bc)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release -q -p imgcache
BIN=$PWD/target/release/imgcache
TCK=$(getconf CLK_TCK)
SIZE=$((SIZE_MIB << 20))
TOKEN=bench-token

chmod 755 "$WORK" # nginx's workers run unprivileged
mkdir -p "$WORK/www/meta" "$WORK/logs" "$WORK/pcache" "$WORK/cache"
head -c "$SIZE" /dev/urandom > "$WORK/www/image.raw"
SUM=$(openssl dgst -sha256 -r "$WORK/www/image.raw" | cut -d' ' -f1)
meta() { # a Glance image record for id $1
  printf '{"id":"%s","status":"active","size":%d,"disk_format":"raw","checksum":null,"os_hash_algo":"sha256","os_hash_value":"%s"}' \
    "$1" "$SIZE" "$SUM" > "$WORK/www/meta/$1.json"
}
ID_MISS=a0000000-0000-4000-8000-000000000001
ID_RSS=a0000000-0000-4000-8000-000000000002
ID_S1=50000000-0000-4000-8000-000000000001
ID_S16=50000000-0000-4000-8000-000000000016
ID_S64=50000000-0000-4000-8000-000000000064
for id in $ID_MISS $ID_RSS $ID_S1 $ID_S16 $ID_S64; do meta "$id"; done

common="pid PIDFILE; error_log $WORK/logs/error.log; events { worker_connections 1024; }"
temps="client_body_temp_path $WORK/logs; proxy_temp_path $WORK/logs; fastcgi_temp_path $WORK/logs; uwsgi_temp_path $WORK/logs; scgi_temp_path $WORK/logs;"
nginx_start() { # name, http block body
  local conf=$WORK/$1.conf
  printf 'worker_processes auto;\n%s\nhttp { %s %s }\n' "${common/PIDFILE/$WORK/$1.pid}" "$temps" "$2" > "$conf"
  nginx -c "$conf" -p "$WORK"
  for _ in $(seq 50); do [ -s "$WORK/$1.pid" ] && break; sleep 0.1; done
}
nginx_start origin "
  log_format data '\$request_uri';
  access_log $WORK/logs/origin.log data;
  sendfile on; tcp_nopush off;
  server { listen 127.0.0.1:$P_ORIGIN; root $WORK/www;
    location ~ ^/v2/images/5[^/]*/file\$ { limit_rate 100m; rewrite ^ /image.raw break; }
    location ~ ^/v2/images/[^/]+/file\$ { rewrite ^ /image.raw break; }
    location ~ ^/v2/images/([^/]+)\$ { default_type application/json; rewrite ^/v2/images/([^/]+)\$ /meta/\$1.json break; }
  }"
nginx_start static "
  access_log off; sendfile on; tcp_nopush off;
  server { listen 127.0.0.1:$P_STATIC; root $WORK/www; }"
nginx_start proxy "
  access_log off;
  proxy_cache_path $WORK/pcache levels=1 keys_zone=img:10m max_size=8g inactive=1h use_temp_path=off;
  server { listen 127.0.0.1:$P_PROXY;
    location / { proxy_pass http://127.0.0.1:$P_ORIGIN; proxy_cache img; proxy_cache_valid 200 1h; proxy_cache_lock on; proxy_cache_lock_timeout 1h; }
  }"
"$BIN" --cache-dir "$WORK/cache" serve --listen "127.0.0.1:$P_IMG" --glance-url "http://127.0.0.1:$P_ORIGIN" \
  --max-size 64G --admin-token bench-admin 2> "$WORK/logs/imgcache.log" &
IMG_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$P_IMG/healthz" >/dev/null && break; sleep 0.1; done
cat "$WORK/www/image.raw" > /dev/null # warm the origin's page cache

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ticks() { # utime+stime of PIDs
  local t=0 p
  for p in "$@"; do t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}'))); done
  echo "$t"
}
nginx_workers() { pgrep -P "$(cat "$WORK/$1.pid")" | tr '\n' ' '; }
img_url() { echo "http://127.0.0.1:$P_IMG/v2/images/$1/file"; }
fetch() { curl -sf -H "X-Auth-Token: $TOKEN" -o /dev/null "$@"; }

echo "image ${SIZE_MIB} MiB, loopback, $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"

PARTS=${PARTS:-miss hit stampede rss}
part() { [[ " $PARTS " == *" $1 "* ]]; }

# --- miss ----------------------------------------------------------------------------------
MISS=0 PMISS=0 CURL=0 SHA=0 BASEL=0
if part miss; then
sync; sleep 1
t0=$(now); fetch "http://127.0.0.1:$P_ORIGIN/v2/images/$ID_MISS/file"; t1=$(now)
CURL=$(echo "$t1 - $t0" | bc)
t0=$(now); openssl dgst -sha256 "$WORK/www/image.raw" >/dev/null; t1=$(now)
SHA=$(echo "$t1 - $t0" | bc)
BASEL=$(echo "if ($CURL > $SHA) $CURL else $SHA" | bc)
t0=$(now); fetch "$(img_url $ID_MISS)"; t1=$(now)
MISS=$(echo "$t1 - $t0" | bc)
sync; sleep 1
t0=$(now); fetch "http://127.0.0.1:$P_PROXY/v2/images/$ID_MISS/file"; t1=$(now)
PMISS=$(echo "$t1 - $t0" | bc)
sync; sleep 1
fi

# --- hit -----------------------------------------------------------------------------------
hit_round() { # server(imgcache|nginx) clients -> "GB/s CPU-s/GiB"
  local url pids c t0 t1 k0 k1
  if [ "$1" = imgcache ]; then url=$(img_url $ID_MISS); pids=$IMG_PID
  else url=http://127.0.0.1:$P_STATIC/image.raw; pids=$(nginx_workers static); fi
  k0=$(ticks $pids); t0=$(now)
  local kids=()
  for c in $(seq "$2"); do fetch "$url" & kids+=($!); done
  wait "${kids[@]}"
  t1=$(now); k1=$(ticks $pids)
  echo "$2 * $SIZE / ($t1 - $t0) / 1000000000" | bc -l | xargs printf '%.3f '
  echo "($k1 - $k0) / $TCK / ($2 * $SIZE / 1073741824)" | bc -l | xargs printf '%.3f\n'
}
declare -A GBS CPU
SENDFILE=0
if part hit; then
fetch "$(img_url $ID_MISS)"; fetch "http://127.0.0.1:$P_STATIC/image.raw" # warm both
for n in 1 8; do
  for s in imgcache nginx; do : > "$WORK/r.$s.$n"; done
  for _ in $(seq "$ROUNDS"); do
    for s in imgcache nginx; do hit_round "$s" "$n" >> "$WORK/r.$s.$n"; done
  done
  for s in imgcache nginx; do
    GBS[$s.$n]=$(cut -d' ' -f1 "$WORK/r.$s.$n" | median)
    CPU[$s.$n]=$(cut -d' ' -f2 "$WORK/r.$s.$n" | median)
  done
done
SENDFILE=$(curl -s "http://127.0.0.1:$P_IMG/metrics" | awk '/^imgcache_served_sendfile_bytes_total/ {print $2}')
fi

# --- stampede ------------------------------------------------------------------------------
stampede() { # id clients -> "origin_requests ttfb_min ttfb_median ttfb_max wall"
  # id "static": the floor, nginx serving the finished file from its page cache, unpaced
  local id=$1 n=$2 t0 t1 c
  : > "$WORK/ttfb"
  t0=$(now)
  local kids=() url; url=$(img_url "$id")
  [ "$id" = static ] && url=http://127.0.0.1:$P_STATIC/image.raw
  for c in $(seq "$n"); do
    curl -sf -H "X-Auth-Token: $TOKEN" -o /dev/null -w '%{time_starttransfer}\n' "$url" >> "$WORK/ttfb" &
    kids+=($!)
  done
  wait "${kids[@]}"
  t1=$(now)
  local reqs; reqs=$(grep -c "^/v2/images/$id/file\$" "$WORK/logs/origin.log" || true)
  [ "$(wc -l < "$WORK/ttfb")" -eq "$n" ] || echo "stampede: only $(wc -l < "$WORK/ttfb") of $n clients succeeded" >&2
  printf '%s %s %s %s %s\n' "$reqs" "$(sort -g "$WORK/ttfb" | head -1)" "$(median < "$WORK/ttfb")" \
    "$(sort -g "$WORK/ttfb" | tail -1)" "$(echo "$t1 - $t0" | bc)"
}
if part stampede; then
S1=$(stampede $ID_S1 1); sync; sleep 1
S16=$(stampede $ID_S16 16); sync; sleep 1
S64=$(stampede $ID_S64 64); sync; sleep 1
C16=$(stampede static 16); C64=$(stampede static 64)
fi

# --- rss -----------------------------------------------------------------------------------
HWM=0
if part rss; then
echo 5 > "/proc/$IMG_PID/clear_refs" # resets VmHWM
kids=()
for _ in $(seq 8); do fetch "$(img_url $ID_RSS)" & kids+=($!); done
wait "${kids[@]}"
HWM=$(awk '/^VmHWM/ {print $2}' "/proc/$IMG_PID/status")
fi

# --- report --------------------------------------------------------------------------------
r() { if [ "$(echo "$2 == 0" | bc)" = 1 ]; then echo n/a; else echo "$1 / $2" | bc -l | xargs printf '%.2f'; fi; }
echo
echo "| measure | imgcache | baseline | ratio |"
echo "| --- | --- | --- | --- |"
part hit && for n in 1 8; do
  echo "| hit, $n client(s): GB/s | ${GBS[imgcache.$n]} | nginx ${GBS[nginx.$n]} | $(r "${GBS[imgcache.$n]}" "${GBS[nginx.$n]}")× |"
  echo "| hit, $n client(s): server CPU-s/GiB | ${CPU[imgcache.$n]} | nginx ${CPU[nginx.$n]} | $(r "${CPU[imgcache.$n]}" "${CPU[nginx.$n]}")× |"
done
part miss && printf '| cold miss + sha256: s (GB/s) | %.3f (%.2f) | max(curl %.3f, openssl %.3f) | %s× speed |\n' \
  "$MISS" "$(echo "$SIZE / $MISS / 1000000000" | bc -l)" "$CURL" "$SHA" "$(r "$BASEL" "$MISS")"
part miss && printf '| cold miss vs nginx proxy_cache miss: s | %.3f | %.3f | %s× speed |\n' "$MISS" "$PMISS" "$(r "$PMISS" "$MISS")"
part stampede && read -r q1 a1 m1 z1 w1 <<< "$S1" && for row in "16 $S16 $C16" "64 $S64 $C64"; do
  read -r n q a m z w _ ca cm cz cw <<< "$row"
  printf '| stampede %s clients: origin data requests | %s | 1 | |\n' "$n" "$q"
  printf '| stampede %s clients: TTFB min/median/max, max-min ms | %.3f/%.3f/%.3f s, %.0f ms | nginx static, unpaced: %.0f ms | |\n' \
    "$n" "$a" "$m" "$z" "$(echo "($z - $a) * 1000" | bc -l)" "$(echo "($cz - $ca) * 1000" | bc -l)"
  printf '| stampede %s clients: wall s | %.2f | 1 client %.2f | %s× |\n' "$n" "$w" "$w1" "$(r "$w" "$w1")"
  printf '| stampede %s clients: wall s vs the floor | %.2f | nginx static, unpaced, %.2f | %s× |\n' "$n" "$w" "$cw" "$(r "$w" "$cw")"
done
part rss && printf '| peak RSS, 8 clients on a miss (VmHWM) | %d MiB | target < 64 MiB | |\n' "$((HWM / 1024))"
echo
echo "hit bytes sent with sendfile: $SENDFILE; ROUNDS=$ROUNDS (hit figures are medians); load after: $(cut -d' ' -f1-3 /proc/loadavg)"
