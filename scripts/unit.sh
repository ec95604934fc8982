#!/usr/bin/env bash
# Runs every test of the workspace (release build: the KVM end-to-end tests
# migrate real guests) and closes with one summary line for people and CI.
# --no-fail-fast: every test binary runs even after one fails, so the summary
# counts them all; the exit status is still non-zero on any failure.
set -euo pipefail
cargo=${CARGO:-cargo}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
"$cargo" test --workspace --release --no-fail-fast 2>&1 | tee "$log" || status=$?
passed=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log")
failed=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log")
echo
echo "summary: $passed passed, $failed failed"
exit "$status"
