#!/usr/bin/env bash
# Format benchmark (issue 4).
#
#   bench/formats.sh [RUNS]      (default 3; medians are reported)
#
#   inspect   `imgcache inspect` of a 20 GiB sparse qcow2 vs a 1 GiB one (and of a 1 GiB qcow2
#             full of data): it reads headers, so the time must not depend on the virtual size.
#   convert   `imgcache fetch --raw file://...` of a 1 GiB qcow2 holding 1 GiB of random data,
#             end to end (link into the cache, sha256 of the qcow2, inspection, qemu-img
#             convert, sha256 of the raw output, fsync, publish, link into dest) vs
#             `qemu-img convert -f qcow2 -O raw` alone on the same file, and vs qemu-img
#             followed by `sync -f` (imgcache fsyncs what it publishes; qemu-img does not).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
WORK=$(mktemp -d /var/tmp/imgcache-formats.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
command -v qemu-img >/dev/null || { echo "qemu-img is needed (do not install qemu-utils over qemu-img 10)" >&2; exit 1; }
cargo build --release -q -p imgcache
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/imgcache

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# seconds for one run of "$@", output discarded
timed() { local t0 t1; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now); echo "$t1 - $t0" | bc -l; }
# Writeback of the previous run and ext4's discard of deleted files must not land in the next.
settle() { sync; sleep 2; }

qemu-img create -q -f qcow2 "$WORK/sparse20g.qcow2" 20G
qemu-img create -q -f qcow2 "$WORK/sparse1g.qcow2" 1G
head -c 1G /dev/urandom > "$WORK/data.raw"
qemu-img convert -q -f raw -O qcow2 "$WORK/data.raw" "$WORK/data.qcow2"
rm "$WORK/data.raw"

inspect_ms() {
    local f=$1 i
    for i in $(seq 20); do timed "$BIN" inspect "$f" --json; done | median | awk '{printf "%.2f", $1 * 1000}'
}
echo "== inspect (median of 20 runs, ms per call, process start included)"
I20=$(inspect_ms "$WORK/sparse20g.qcow2")
I1=$(inspect_ms "$WORK/sparse1g.qcow2")
ID=$(inspect_ms "$WORK/data.qcow2")
printf "  20 GiB sparse qcow2   %8s ms\n   1 GiB sparse qcow2   %8s ms\n   1 GiB qcow2 (data)   %8s ms\n" "$I20" "$I1" "$ID"
printf "  ratio 20 GiB / 1 GiB  %8.2f\n" "$(echo "$I20 / $I1" | bc -l)"
"$BIN" inspect "$WORK/sparse20g.qcow2" | sed -n '2,4p' | sed 's/^/    /'

echo "== convert a 1 GiB qcow2 (1 GiB of random data) to raw (median of $RUNS runs, s)"
q=() qs=() f=()
for i in $(seq "$RUNS"); do
    rm -f "$WORK/out.raw"; settle
    q+=("$(timed qemu-img convert -f qcow2 -O raw "$WORK/data.qcow2" "$WORK/out.raw")")
    rm -f "$WORK/out.raw"; settle
    qs+=("$(timed sh -c "qemu-img convert -f qcow2 -O raw '$WORK/data.qcow2' '$WORK/out.raw' && sync -f '$WORK/out.raw'")")
    rm -f "$WORK/out.raw"
    rm -rf "$WORK/cache" "$WORK/dest"
    mkdir -p "$WORK/dest"; settle
    f+=("$(timed "$BIN" --cache-dir "$WORK/cache" fetch --raw -q --allow-file-dir "$WORK" \
        "file://$WORK/data.qcow2" "$WORK/dest/disk.raw")")
    [ -s "$WORK/dest/disk.raw" ] || { echo "imgcache fetch --raw failed" >&2; exit 1; }
    printf "  run %d: qemu-img %.2f s, qemu-img+sync %.2f s, fetch --raw %.2f s\n" "$i" "${q[-1]}" "${qs[-1]}" "${f[-1]}"
done
Q=$(printf '%s\n' "${q[@]}" | median)
QS=$(printf '%s\n' "${qs[@]}" | median)
F=$(printf '%s\n' "${f[@]}" | median)
printf "  qemu-img convert alone          %6.2f s\n" "$Q"
printf "  qemu-img convert + sync -f      %6.2f s\n" "$QS"
printf "  imgcache fetch --raw file://    %6.2f s\n" "$F"
printf "  ratio fetch --raw / qemu-img    %6.2f\n" "$(echo "$F / $Q" | bc -l)"
printf "  ratio fetch --raw / qemu+sync   %6.2f\n" "$(echo "$F / $QS" | bc -l)"
qemu-img convert -q -f qcow2 -O raw "$WORK/data.qcow2" "$WORK/out.raw"
cmp "$WORK/out.raw" "$WORK/dest/disk.raw" && echo "  output identical to qemu-img's"
