#!/usr/bin/env bash
# Runs every cargo-fuzz target for a while: fuzz/run.sh [SECONDS-PER-TARGET] [TARGET...]
# (default 60 s each, all targets). Needs nightly and cargo-fuzz (`cargo install cargo-fuzz`).
# Targets: range, conditional, href, key (this directory) and inspect (crates/formats/fuzz).
# Corpora grow in fuzz/corpus/<target>/ (crates/formats/fuzz/corpus/inspect/); a crash is
# saved under artifacts/<target>/ and fails the script. Runs at nice 19.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
secs="${1:-60}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(range conditional href key inspect)
jobs="${FUZZ_JOBS:-1}"
failed=()
for t in "${targets[@]}"; do
    dir="$here"
    [[ $t == inspect ]] && dir="$here/../crates/formats/fuzz"
    mkdir -p "$dir/corpus/$t"
    echo "==> $t for ${secs}s ($dir)"
    (cd "$dir" && nice -n 19 cargo +nightly fuzz build "$t" >"/tmp/fuzz-$t.build.log" 2>&1) ||
        { echo "$t: build failed (/tmp/fuzz-$t.build.log)"; failed+=("$t"); continue; }
    start=$(date +%s)
    if (cd "$dir" && nice -n 19 cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -jobs="$jobs" -workers="$jobs" -print_final_stats=1 \
        >"/tmp/fuzz-$t.log" 2>&1); then
        status=ok
    else
        status=FAILED
        failed+=("$t")
    fi
    runs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "/tmp/fuzz-$t.log" | tail -n1 | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -ao 'cov: [0-9]*' "/tmp/fuzz-$t.log" | tail -n1 | grep -o '[0-9]*$' || echo "?")
    echo "$t: $status, $(( $(date +%s) - start ))s, $runs executions, coverage $cov, corpus $(ls "$dir/corpus/$t" | wc -l) files (log /tmp/fuzz-$t.log)"
done
if ((${#failed[@]})); then
    echo "crashed: ${failed[*]} (see artifacts/ and the logs)" >&2
    exit 1
fi
