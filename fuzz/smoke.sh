#!/usr/bin/env bash
# CI smoke of the fuzz targets: builds them (AddressSanitizer; FUZZ_SANITIZER=none to
# build without) and runs each for FUZZ_SECONDS (default 10) on the committed corpus.
# New inputs go to a scratch directory, so the corpus in git is left as it is. Any
# crash fails the script; libFuzzer prints the input it saved under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"
# cargo-fuzz passes -Z flags to rustc; stable accepts them with RUSTC_BOOTSTRAP, and the
# ASan runtime (librustc-stable_rt.asan.a) ships with the stable standard library.
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-10}"
sanitizer="${FUZZ_SANITIZER:-address}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cargo fuzz build -s "$sanitizer"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
    echo "--- fuzz $target for ${seconds}s"
    mkdir -p "$scratch/$target" "corpus/$target"
    # The first corpus directory receives new inputs; the committed one is only read.
    log="$scratch/$target.log"
    status=0
    cargo fuzz run -s "$sanitizer" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 80 "$log"
        echo "FAIL: fuzz target $target (exit $status)"
        exit 1
    fi
    grep -E 'INITED|DONE|stat::number_of_executed_units|stat::average_exec_per_sec' "$log" || true
done
