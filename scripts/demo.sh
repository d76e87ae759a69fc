#!/usr/bin/env bash
# imgcache demo: builds the release binary and walks one image through a cache on the default
# (embedded SQLite) driver: the store commands, provisioning (fetch), then `imgcache serve`. Needs only a Rust toolchain; everything goes under ./demo-cache,
# which is wiped at the start so the demo can be run again.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD/demo-cache
cache=$root/cache
image=$root/cirros-demo.img
bin=$PWD/target/release/imgcache

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
run() {
    printf '$ imgcache %s\n' "$*"
    "$bin" --cache-dir "$cache" "$@"
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain first (https://rustup.rs)" >&2
    exit 1
fi

step "Building imgcache (cargo build --release)"
cargo build --release -p imgcache

step "Making a 64 MiB demo image in $image"
rm -rf "$root"
mkdir -p "$root"
head -c $((64 << 20)) /dev/urandom >"$image"
sum=sha256:$(sha256sum "$image" | cut -d' ' -f1)
echo "$sum"

step "Publishing it into the cache (streamed to incomplete/, checksum verified, fsync, rename)"
run add cirros-demo "$image" --checksum "$sum"

step "Adding the same key again publishes nothing"
run add cirros-demo "$image"

step "Listing cached images"
run list
run list --json

step "Cache statistics"
run stats

step "Queueing an image id for prefetching"
run queue 6a2b5b54-2d8c-4d6a-9f4e-0c1b2c3d4e5f
run list --queued

step "Pruning to a max size of 0 (evicts least recently accessed first)"
run prune --max-size 0

step "Cleaning (stalled writes, invalid files, records without files; foreign files are left alone)"
run clean

step "Statistics after pruning"
run stats

step "Provisioning: fetch the image into a deploy directory (downloaded once, then hard-linked)"
mkdir -p "$root/deploy"
run fetch --allow-file-dir "$root" "file://$image" "$root/deploy/node1.img"
run fetch --allow-file-dir "$root" "file://$image" "$root/deploy/node2.img"
ls -li "$root/deploy"

step "The main job: imgcache serve (one origin download per image, every client streamed)"
port=${IMGCACHE_DEMO_PORT:-19292}
"$bin" --cache-dir "$cache" serve --listen "127.0.0.1:$port" --admin-token demo \
    --allow-href-prefix "file://$root/" --allow-file-dir "$root" >"$root/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
served=$root/served.img
head -c $((32 << 20)) /dev/urandom >"$served"
url="http://127.0.0.1:$port/v1/fetch?href=file://$served"
for attempt in miss hit; do
    printf '$ curl -o /dev/null %s   # %s\n' "$url" "$attempt"
    curl -sf -o /dev/null -w '  %{http_code}, %{size_download} bytes in %{time_total}s\n' "$url"
done
printf '$ curl -H "X-Auth-Token: demo" http://127.0.0.1:%s/v2/cache   # Glance cache API\n' "$port"
curl -sf -H "X-Auth-Token: demo" "http://127.0.0.1:$port/v2/cache"
echo
printf '$ curl http://127.0.0.1:%s/metrics | grep cache_\n' "$port"
curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^imgcache_cache_(hits|misses)' || true
kill -TERM "$server"
wait "$server" || true
trap - EXIT

printf '\nDone. The demo cache is in %s (remove it with: rm -rf demo-cache).\n' "$cache"
printf 'Run the server yourself: %s --cache-dir %s serve\n' "$bin" "$cache"
