#!/bin/sh
# Runs one cargo-fuzz target for a given time, starting from the committed seeds.
# Usage: fuzz/run.sh TARGET SECONDS   (targets: stream_decoder return_path roundtrip destination_session source_session)
set -eu
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
secs=${2:-60}
cd "$(dirname "$0")"
mkdir -p "corpus/$target" "seeds/$target"
# -s none: no AddressSanitizer. ferry-core has no unsafe code, so ASan finds nothing the
# bounds checks don't, and it made the targets 3-6 times slower. Debug assertions and
# overflow checks stay on (cargo fuzz's default), as do the harnesses' own checks.
RUSTC_BOOTSTRAP=1 exec cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -max_len=8192 -print_final_stats=1
