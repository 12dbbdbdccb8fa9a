#!/usr/bin/env bash
# Benchmark: 500 concurrent SSE executes through nginx (nginx/runbookd.conf in front of a
# release build of runbookd), each running a script that prints, sleeps 2 s and prints.
# Prints, for each of RUNS rounds (default 3), how many streams started (first event) within
# 1 s and the start latency distribution. Needs nginx and prlimit; run as root or with a
# descriptor hard limit of at least 8192.
#
# Usage: nginx/bench.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${1:-3}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export PATH="$PATH:/usr/sbin:/sbin"

# Build once, then run the measurement RUNS times.
RUNBOOKD_FULL_TESTS=1 cargo test --release --test integration --no-run
for i in $(seq 1 "$runs"); do
    RUNBOOKD_FULL_TESTS=1 cargo test --release --test integration \
        deploy::five_hundred_concurrent_streams_through_nginx -- --exact --nocapture 2>&1 |
        grep -E '^(test deploy::five_hundred_concurrent_streams_through_nginx \.\.\. )?nginx-500:' |
        sed -e "s/^test [^ ]* \.\.\. //" -e "s/^/round $i: /"
done
