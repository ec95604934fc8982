#!/bin/sh
# Runs one cargo-fuzz target for a given time, starting from the committed seeds.
# Usage: fuzz/run.sh TARGET SECONDS   (targets: stream_decoder return_path roundtrip destination_session source_session)
set -eu
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
secs=${2:-60}
cd "$(dirname "$0")"
mkdir -p "corpus/$target" "seeds/$target"
RUSTC_BOOTSTRAP=1 exec cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -max_len=8192 -print_final_stats=1
