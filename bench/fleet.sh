#!/usr/bin/env bash
# Fleet benchmark: N `imgcache serve` nodes sharing one PostgreSQL index against N independent
# caches, behind one origin whose uplink is capped in aggregate. Ratios from one run.
#
#   sudo bench/fleet.sh          (root: network namespaces, veths, tc)
#   SIZE=1G CAP=400mbit NODES="3 5" SAMPLES=200 CACHE_FS=tmpfs ORIGIN_MD5=1 bench/fleet.sh
#
# Topology (everything is removed on exit, whatever the exit):
#   bridge icfb0 10.213.0.1/24 in the root namespace; PostgreSQL 15 listens there
#   namespace icfb-origin, 10.213.0.2: nginx serving a random SIZE image (sendfile), access log
#     of `$bytes_sent` per request (origin bytes are summed from it); `tc qdisc ... tbf rate CAP`
#     on its veth (the origin side, egress), so the origin's uplink is capped in aggregate, as
#     nginx `limit_rate` (per connection) would not. No qdisc anywhere else, never on the
#     host's lo.
#   namespace icfb-nI, 10.213.0.(10+I): node I, `imgcache serve` on :9292 with its own cache
#     directory (on a tmpfs by default, CACHE_FS=disk for $TMPDIR: all nodes of this one
#     machine share one disk, which real nodes do not), and the curl that asks it.
#   Node to node traffic goes over the bridge, uncapped (a rack's switch).
# For each N in NODES:
#   cold     one plain node alone fills the image (`/v1/fetch?href=`): the baseline time
#   fleet    N nodes with --fleet-db, all asked at once; time until every curl got the whole
#            image with the exact sha256 (a response's last byte is held until the node
#            verified it), then each node's /v2/cache must list it; origin bytes
#   indep    the same N nodes without --fleet-db (N independent caches), same cap
#   lookup   the miss overhead of fleet mode: SAMPLES misses of a small (64 KiB) image on fleet
#            node 1 (N nodes in the index) and on a plain node in the same namespace, interleaved,
#            each a fresh href; curl's time_starttransfer, p50/p99 of each and the p99 difference;
#            and the lookup itself as node 1 measures it (imgcache_fleet_source_seconds)
# ORIGIN_MD5=1 (default) makes the origin send `Content-MD5` (RFC 1864), a checksum it vouches
# for before the first byte: fleet nodes then follow a node that is still filling. With
# ORIGIN_MD5=0 (a plain URL, nothing vouched) a filler is followed only once it has published
# (see README "Fleet mode"): the other nodes wait for the first, then copy from it.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
CAP=${CAP:-400mbit}
NODES=${NODES:-3 5}
SAMPLES=${SAMPLES:-200}
CACHE_FS=${CACHE_FS:-tmpfs}
ORIGIN_MD5=${ORIGIN_MD5:-1}
PGBIN=${PGBIN:-$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
[ "$(id -u)" = 0 ] || { echo "fleet.sh: needs root (ip netns, tc)" >&2; exit 1; }

NET=10.213.0 BR=icfb0 PFX=icfb PGPORT=15432 OPORT=8080 NPORT=9292
TOKEN=bench-fleet-token ADMIN=bench-admin
WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgcache-fleet-bench.XXXXXX")
MAXN=0; for n in $NODES; do [ "$n" -gt "$MAXN" ] && MAXN=$n; done

pids=() # imgcache nodes of the current phase
stop_nodes() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  set +e
  stop_nodes
  [ -f "$WORK/origin.pid" ] && kill "$(cat "$WORK/origin.pid")" 2>/dev/null
  [ -d "$WORK/pg/data" ] && runuser -u nobody -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate -w stop >/dev/null 2>&1
  ip netns pids "$PFX-origin" 2>/dev/null | xargs -r kill 2>/dev/null
  sleep 0.3
  ip netns exec "$PFX-origin" tc qdisc del dev "${PFX}o" root 2>/dev/null
  for i in $(seq "$MAXN"); do
    ip link del "${PFX}${i}h" 2>/dev/null; ip netns del "$PFX-n$i" 2>/dev/null
  done
  ip link del "${PFX}oh" 2>/dev/null; ip netns del "$PFX-origin" 2>/dev/null
  ip link del "$BR" 2>/dev/null
  mountpoint -q "$WORK/caches" && umount "$WORK/caches"
  rm -rf "$WORK"
  sync # ext4 with discard: the deletes cost their discards now, not in the next run
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v bc >/dev/null || need+=(bc)
command -v tc >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
[ -x "$PGBIN/initdb" ] || { echo "fleet.sh: no PostgreSQL (initdb) in $PGBIN" >&2; exit 1; }
cargo build --release -q -p imgcache
BIN=$PWD/target/release/imgcache

# --- network -------------------------------------------------------------------------------
ip link add "$BR" type bridge
ip addr add "$NET.1/24" dev "$BR"
ip link set "$BR" up
veth_ns() { # namespace, ns-side name, host-side name, address
  ip netns add "$1"
  ip link add "$2" type veth peer name "$3"
  ip link set "$2" netns "$1"
  ip link set "$3" master "$BR" up
  ip netns exec "$1" ip addr add "$4/24" dev "$2"
  ip netns exec "$1" ip link set "$2" up
  ip netns exec "$1" ip link set lo up
}
veth_ns "$PFX-origin" "${PFX}o" "${PFX}oh" "$NET.2"
for i in $(seq "$MAXN"); do veth_ns "$PFX-n$i" "${PFX}$i" "${PFX}${i}h" "$NET.$((10 + i))"; done
# The origin's uplink, in aggregate. burst: 256 KiB holds a few 64 KiB GSO packets.
ip netns exec "$PFX-origin" tc qdisc add dev "${PFX}o" root tbf rate "$CAP" burst 256kb latency 100ms

# --- origin --------------------------------------------------------------------------------
chmod 755 "$WORK" # nginx's workers and PostgreSQL run unprivileged
mkdir -p "$WORK/www" "$WORK/logs" "$WORK/caches"
BYTES=$(numfmt --from=iec "$SIZE")
head -c "$BYTES" /dev/urandom > "$WORK/www/image.raw"
head -c 65536 /dev/urandom > "$WORK/www/small.raw"
SUM=$(openssl dgst -sha256 -r "$WORK/www/image.raw" | cut -d' ' -f1)
MD5HDR=
[ "$ORIGIN_MD5" = 1 ] && MD5HDR="add_header Content-MD5 $(openssl dgst -md5 -binary "$WORK/www/image.raw" | base64);"
cat > "$WORK/origin.conf" <<CONF
worker_processes 2;
pid $WORK/origin.pid;
error_log $WORK/logs/error.log;
events { worker_connections 1024; }
http {
  client_body_temp_path $WORK/logs; proxy_temp_path $WORK/logs; fastcgi_temp_path $WORK/logs;
  uwsgi_temp_path $WORK/logs; scgi_temp_path $WORK/logs;
  log_format bytes '\$request_uri \$status \$bytes_sent';
  access_log $WORK/logs/origin.log bytes;
  sendfile on; tcp_nopush off;
  server { listen $NET.2:$OPORT; root $WORK/www;
    location = /image.raw { $MD5HDR }
  }
}
CONF
ip netns exec "$PFX-origin" nginx -c "$WORK/origin.conf" -p "$WORK"
for _ in $(seq 50); do [ -s "$WORK/origin.pid" ] && break; sleep 0.1; done
cat "$WORK/www/image.raw" > /dev/null # the origin's page cache
ORIGIN=http://$NET.2:$OPORT

# --- PostgreSQL, on the bridge address (one database per fleet phase) ----------------------
mkdir -p "$WORK/pg" && chown nobody: "$WORK/pg"
pg() { (cd "$WORK/pg" && runuser -u nobody -- "$PGBIN/$1" "${@:2}"); }
pg initdb -D "$WORK/pg/data" -A trust -U postgres --no-sync >/dev/null
echo "host all all $NET.0/24 trust" >> "$WORK/pg/data/pg_hba.conf"
pg pg_ctl -D "$WORK/pg/data" -o "-k $WORK/pg -h $NET.1 -p $PGPORT -c fsync=off" -l "$WORK/pg/log" -w start >/dev/null
new_db() { # name -> DB, the url of a fresh database
  pg psql -q -v ON_ERROR_STOP=1 -h "$WORK/pg" -p "$PGPORT" -U postgres -c "CREATE DATABASE $1" postgres
  DB=postgresql://postgres@$NET.1:$PGPORT/$1
}

# --- helpers -------------------------------------------------------------------------------
now() { date +%s.%N; }
addr() { echo "$NET.$((10 + $1))"; }
node_url() { echo "http://$(addr "$1"):${2:-$NPORT}"; }
urlenc() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
fetch_url() { echo "$(node_url "$1" "${3:-}")/v1/fetch?href=$(urlenc "$2")"; }
CACHESEQ=0
start_node() { # index, fleet db url or "", [port] -> appends to pids
  local i=$1 db=$2 port=${3:-$NPORT} dir
  CACHESEQ=$((CACHESEQ + 1)); dir=$WORK/caches/c$CACHESEQ
  local fleet=()
  [ -n "$db" ] && fleet=(--fleet-db "$db" --fleet-token "$TOKEN" --node-url "$(node_url "$i" "$port")")
  ip netns exec "$PFX-n$i" env IMGCACHE_HEARTBEAT_TIMEOUT=10s "$BIN" --cache-dir "$dir" serve \
    --listen "$(addr "$i"):$port" --allow-href-prefix "$ORIGIN/" --max-size 64G \
    --admin-token "$ADMIN" "${fleet[@]}" > /dev/null 2>> "$WORK/logs/node$i.log" &
  pids+=($!)
}
wait_up() { # index [port]
  for _ in $(seq 200); do
    ip netns exec "$PFX-n$1" curl -sf -o /dev/null "$(node_url "$1" "${2:-}")/healthz" && return 0
    sleep 0.1
  done
  echo "fleet.sh: node $1 did not start:" >&2; tail -5 "$WORK/logs/node$1.log" >&2; exit 1
}
origin_mark() { wc -l < "$WORK/logs/origin.log"; }
origin_bytes_since() { tail -n +"$(($1 + 1))" "$WORK/logs/origin.log" | awk '{s += $3} END {printf "%.0f\n", s}'; }
origin_reqs_since() { tail -n +"$(($1 + 1))" "$WORK/logs/origin.log" | grep -c "^/image.raw" || true; }
settle() { rm -rf "$WORK"/caches/*; sync; sleep 1; }

# All of nodes 1..n asked for href at once, each by a curl in its own namespace piping the body
# into sha256; prints the wall time until the last one finished. Fails on a wrong sha256.
fill_all() { # n href
  local n=$1 href=$2 i t0 t1 kids=()
  t0=$(now)
  for i in $(seq "$n"); do
    ip netns exec "$PFX-n$i" sh -c 'curl -sf "$1" | openssl dgst -sha256 -r | cut -d" " -f1' _ \
      "$(fetch_url "$i" "$href")" > "$WORK/sum.$i" & kids+=($!)
  done
  wait "${kids[@]}"
  t1=$(now)
  for i in $(seq "$n"); do
    [ "$(cat "$WORK/sum.$i")" = "$SUM" ] || { echo "fleet.sh: node $i served a wrong image (sha256 $(cat "$WORK/sum.$i"))" >&2; exit 1; }
  done
  # Every node holds it, as its own cache listing says (not part of the timing).
  for i in $(seq "$n"); do
    local ok=0
    for _ in $(seq 50); do
      ip netns exec "$PFX-n$i" curl -sf -H "X-Auth-Token: $ADMIN" "$(node_url "$i")/v2/cache" \
        | grep -qF "\"$href\"" && { ok=1; break; }
      sleep 0.1
    done
    [ "$ok" = 1 ] || { echo "fleet.sh: node $i does not list $href as cached" >&2; exit 1; }
  done
  echo "$t1 - $t0" | bc
}
peer_fills() { # node indexes -> total peer fills (metrics), for the report
  local i s=0 v
  for i in "$@"; do
    v=$(ip netns exec "$PFX-n$i" curl -sf "$(node_url "$i")/metrics" \
      | awk '/^imgcache_peer_fills_total/ {s += $2} END {printf "%.0f\n", s}')
    s=$((s + v))
  done
  echo "$s"
}
# A node's own count of a miss's time to choose its source (imgcache_fleet_source_seconds,
# source="origin": the index's lookups and the lease, no wait): "COUNT P50_S P99_S LE2MS" with
# the quantiles interpolated within buckets as Prometheus' histogram_quantile does, and the
# share of misses at or under 2 ms.
source_quantiles() {
  ip netns exec "$PFX-n$1" curl -sf "$(node_url "$1")/metrics" | awk '
    /^imgcache_fleet_source_seconds_bucket\{.*source="origin"/ {
      match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
      n++; b[n] = (le == "+Inf") ? 1e9 : le + 0; c[n] = $NF + 0 }
    END {
      if (n == 0 || c[n] == 0) { print "0 0 0 0"; exit }
      tot = c[n]
      for (q = 1; q <= 2; q++) {
        want = (q == 1 ? 0.5 : 0.99) * tot; prevb = 0; prevc = 0
        for (i = 1; i <= n; i++) {
          if (c[i] >= want) { v[q] = prevb + (b[i] - prevb) * (want - prevc) / (c[i] - prevc); break }
          prevb = b[i]; prevc = c[i]
        }
      }
      le2 = 0; for (i = 1; i <= n; i++) if (b[i] <= 0.002 + 1e-12) le2 = c[i]
      printf "%d %.6f %.6f %.4f\n", tot, v[1], v[2], le2 / tot
    }'
}
pct() { sort -g | awk -v p="$1" '{a[NR]=$1} END {i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; print a[i]}'; }

echo "fleet bench: image $SIZE ($BYTES bytes), origin cap tbf $CAP, NODES=\"$NODES\", caches on $CACHE_FS, origin Content-MD5: $ORIGIN_MD5"
echo "machine: $(nproc) cores, $(free -g | awk '/^Mem/ {print $2}') GiB, kernel $(uname -r), load: $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$CACHE_FS" = tmpfs ] && mount -t tmpfs -o size=$((BYTES * (MAXN + 1) + (1 << 30))) imgcache-fleet-bench "$WORK/caches"

declare -A R
RUN=0
for N in $NODES; do
  # (c) one node alone, cold: the baseline.
  RUN=$((RUN + 1)); settle
  start_node 1 ""; wait_up 1
  m=$(origin_mark); R[cold.$N]=$(fill_all 1 "$ORIGIN/image.raw?run=$RUN-cold"); R[cold.b.$N]=$(origin_bytes_since "$m")
  stop_nodes

  # (a) fleet mode: N nodes, one index.
  RUN=$((RUN + 1)); settle
  new_db "fleet$RUN"
  for i in $(seq "$N"); do start_node "$i" "$DB"; done
  for i in $(seq "$N"); do wait_up "$i"; done
  m=$(origin_mark); R[fleet.$N]=$(fill_all "$N" "$ORIGIN/image.raw?run=$RUN-fleet")
  R[fleet.b.$N]=$(origin_bytes_since "$m"); R[fleet.q.$N]=$(origin_reqs_since "$m")
  R[fleet.p.$N]=$(peer_fills $(seq "$N"))

  # (d) lookup overhead on a miss: fleet node 1 (N nodes in the index) against a plain node
  # on another port of the same namespace, interleaved, a fresh href each time.
  start_node 1 "" $((NPORT + 1)); wait_up 1 $((NPORT + 1))
  : > "$WORK/ttfb.fleet"; : > "$WORK/ttfb.plain"
  for s in $(seq "$SAMPLES"); do
    ip netns exec "$PFX-n1" curl -sf -o /dev/null -w '%{time_starttransfer}\n' \
      "$(fetch_url 1 "$ORIGIN/small.raw?run=$RUN-f$s")" >> "$WORK/ttfb.fleet"
    ip netns exec "$PFX-n1" curl -sf -o /dev/null -w '%{time_starttransfer}\n' \
      "$(fetch_url 1 "$ORIGIN/small.raw?run=$RUN-p$s" $((NPORT + 1)))" >> "$WORK/ttfb.plain"
  done
  R[src.$N]=$(source_quantiles 1)
  for k in fleet plain; do
    [ "$(wc -l < "$WORK/ttfb.$k")" -eq "$SAMPLES" ] || { echo "fleet.sh: lookup samples failed ($k)" >&2; exit 1; }
    R[lk.$k.50.$N]=$(pct 50 < "$WORK/ttfb.$k"); R[lk.$k.99.$N]=$(pct 99 < "$WORK/ttfb.$k")
  done
  # Context: one PostgreSQL round trip from a node's namespace, as the wall time of 1000
  # `SELECT 1` in one psql session over TCP (psql's own parsing included: an upper bound).
  t0=$(now)
  for _ in $(seq 1000); do echo 'SELECT 1;'; done \
    | ip netns exec "$PFX-n1" psql -q -At -h "$NET.1" -p "$PGPORT" -U postgres "fleet$RUN" > /dev/null
  R[rtt.$N]=$(echo "($(now) - $t0) / 1000 * 1000" | bc -l | xargs printf '%.3f')
  stop_nodes

  # (b) the same N nodes as independent caches, same cap.
  RUN=$((RUN + 1)); settle
  for i in $(seq "$N"); do start_node "$i" ""; done
  for i in $(seq "$N"); do wait_up "$i"; done
  m=$(origin_mark); R[indep.$N]=$(fill_all "$N" "$ORIGIN/image.raw?run=$RUN-indep")
  R[indep.b.$N]=$(origin_bytes_since "$m"); R[indep.q.$N]=$(origin_reqs_since "$m")
  stop_nodes
  echo "N=$N done: cold ${R[cold.$N]} s, fleet ${R[fleet.$N]} s, independent ${R[indep.$N]} s"
done
settle

# --- report --------------------------------------------------------------------------------
f2() { echo "$1" | bc -l | xargs printf '%.2f'; }
ms() { echo "($1) * 1000" | bc -l | xargs printf '%.2f'; }
echo
echo "| N | measure | fleet | independent | target (fleet) |"
echo "| --- | --- | --- | --- | --- |"
for N in $NODES; do
  echo "| $N | origin bytes ÷ image size | $(f2 "${R[fleet.b.$N]} / $BYTES") (${R[fleet.q.$N]} image request(s)) | $(f2 "${R[indep.b.$N]} / $BYTES") (${R[indep.q.$N]} image request(s)) | 1.00 |"
  echo "| $N | time until all $N hold it verified ÷ one node's cold fill | $(f2 "${R[fleet.$N]} / ${R[cold.$N]}") ($(f2 "${R[fleet.$N]}") s ÷ $(f2 "${R[cold.$N]}") s) | $(f2 "${R[indep.$N]} / ${R[cold.$N]}") ($(f2 "${R[indep.$N]}") s) | ≤ 1.2 |"
  echo "| $N | miss TTFB, 64 KiB, p50 / p99 ($SAMPLES samples) | $(ms "${R[lk.fleet.50.$N]}") / $(ms "${R[lk.fleet.99.$N]}") ms | $(ms "${R[lk.plain.50.$N]}") / $(ms "${R[lk.plain.99.$N]}") ms | |"
  echo "| $N | lookup overhead on a miss: p99 fleet − p99 plain (p50 −) | $(ms "${R[lk.fleet.99.$N]} - ${R[lk.plain.99.$N]}") ms ($(ms "${R[lk.fleet.50.$N]} - ${R[lk.plain.50.$N]}") ms) | (one PostgreSQL round trip, SELECT 1: ≤ ${R[rtt.$N]} ms) | ≤ 2 ms |"
  read -r sc s50 s99 sle2 <<< "${R[src.$N]}"
  echo "| $N | lookup on a miss, the node's own histogram (imgcache_fleet_source_seconds, source=origin): p50 / p99 | $(ms "$s50") / $(ms "$s99") ms ($(f2 "$sle2 * 100") % of $sc misses ≤ 2 ms) | | ≤ 2 ms |"
done
echo
for N in $NODES; do
  echo "N=$N: cold fill alone ${R[cold.$N]} s ($(f2 "$BYTES * 8 / ${R[cold.$N]} / 1000000") Mbit/s, origin bytes ÷ size $(f2 "${R[cold.b.$N]} / $BYTES")); fleet peer fills ${R[fleet.p.$N]} of $((N - 1)) nodes that did not go to the origin"
done
echo "lookup overhead: the difference of two p99s of $SAMPLES samples each; on a busy machine both tails are scheduling noise and it can be negative: read the p50 difference as the steadier figure"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
