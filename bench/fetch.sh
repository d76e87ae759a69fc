#!/usr/bin/env bash
# Provisioning benchmark (issue 3): `imgcache fetch` against curl + openssl, same origin, same run.
#
#   bench/fetch.sh [SIZE_MIB]      (default 1024)
#
# Origin: nginx on 127.0.0.1 serving a random file with sendfile. Reports, as medians of 3 runs:
#   miss      imgcache fetch (download + sha256 verify + publish + hard link) vs
#             curl -o FILE && openssl dgst -sha256 FILE  (openssl uses SHA-NI; coreutils does not)
#   hit       per call, fresh within a 1h revalidation interval (no origin request) and, the
#             default, with a conditional GET answered 304 (interval 0), vs curl -I (one HEAD)
#   RSS       peak resident set size of the miss (must not grow with the image size)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
WORK=$(mktemp -d /tmp/imgcache-bench.XXXXXX)
PORT=${PORT:-18080}
trap '[ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v bc >/dev/null || need+=(bc)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release -q -p imgcache
BIN=$PWD/target/release/imgcache

chmod 755 "$WORK" # nginx's workers run unprivileged
mkdir -p "$WORK/www" "$WORK/logs" "$WORK/dest"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$WORK/www/image.raw"
SUM=$(openssl dgst -sha256 -r "$WORK/www/image.raw" | cut -d' ' -f1)
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/logs/error.log;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on; tcp_nopush off;
  client_body_temp_path $WORK/logs; proxy_temp_path $WORK/logs; fastcgi_temp_path $WORK/logs;
  uwsgi_temp_path $WORK/logs; scgi_temp_path $WORK/logs;
  server { listen 127.0.0.1:$PORT; root $WORK/www; }
}
CONF
nginx -c "$WORK/nginx.conf" -p "$WORK"
URL=http://127.0.0.1:$PORT/image.raw
for _ in $(seq 50); do curl -sfI "$URL" >/dev/null && break; sleep 0.1; done

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Peak RSS in KiB of a command (GNU time's %M).
rss() { /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -1; }

echo "image: ${SIZE_MIB} MiB, origin nginx on loopback"
cat "$WORK/www/image.raw" > /dev/null # warm the origin's page cache

base=(); miss=(); peak=0
# Deleting a 1 GiB file makes ext4 (mounted with discard here) free and discard its blocks in
# the background, slowing whatever runs next: every deletion is followed by a sync and a pause.
settle() { rm -rf "$@"; sync; sleep 1; }
for i in 1 2 3; do
  settle "$WORK/curl.img" "$WORK/cache" "$WORK/dest/img.$((i - 1))"
  t0=$(now); curl -sf -o "$WORK/curl.img" "$URL"; openssl dgst -sha256 "$WORK/curl.img" >/dev/null; t1=$(now)
  base+=("$(echo "$t1 - $t0" | bc)")
  settle "$WORK/curl.img"
  t0=$(now)
  kb=$(rss "$BIN" --cache-dir "$WORK/cache" fetch --quiet --checksum "sha256:$SUM" "$URL" "$WORK/dest/img.$i")
  t1=$(now)
  miss+=("$(echo "$t1 - $t0" | bc)")
  [ "$kb" -gt "$peak" ] && peak=$kb
done
settle "$WORK/curl.img"
B=$(printf '%s\n' "${base[@]}" | median); M=$(printf '%s\n' "${miss[@]}" | median)
printf 'miss   curl+openssl %.3fs   imgcache fetch %.3fs   ratio (baseline/imgcache) %.2f   imgcache %.2f GB/s\n' \
  "$B" "$M" "$(echo "$B / $M" | bc -l)" "$(echo "$SIZE_MIB * 1048576 / $M / 1000000000" | bc -l)"
printf 'rss    peak %d MiB during a %d MiB miss\n' "$((peak / 1024))" "$SIZE_MIB"

N=100
# Fresh: a master checked within the interval (1h here) is linked without asking the origin.
t0=$(now); for i in $(seq $N); do IMGCACHE_REVALIDATE_INTERVAL=1h "$BIN" --cache-dir "$WORK/cache" fetch --quiet "$URL" "$WORK/dest/hit.$i" >/dev/null; done; t1=$(now)
HIT=$(echo "($t1 - $t0) / $N * 1000" | bc -l)
# The default: every call asks the origin with one conditional GET (304), as Ironic does.
t0=$(now); for i in $(seq $N); do "$BIN" --cache-dir "$WORK/cache" fetch --quiet "$URL" "$WORK/dest/rev.$i" >/dev/null; done; t1=$(now)
REV=$(echo "($t1 - $t0) / $N * 1000" | bc -l)
t0=$(now); for _ in $(seq $N); do curl -sI "$URL" >/dev/null; done; t1=$(now)
HEAD=$(echo "($t1 - $t0) / $N * 1000" | bc -l)
printf 'hit    fresh %.2f ms/call   revalidated (304) %.2f ms/call   curl -I %.2f ms/call   (whole process per call)\n' "$HIT" "$REV" "$HEAD"
[ "$(stat -c %h "$WORK/dest/hit.1")" -gt 1 ] && echo "check  dest is a hard link of the master: yes"
