#!/usr/bin/env bash
# Builds a binary of the workspace as a static executable for a guest and
# prints its path on the last line. The one recipe for the test harness
# (tests/src/guest.rs) and scripts/test.sh, which builds ahead of runs that
# must not compile (inside the emulated-SVM guest).
#
#   tests/build-static.sh PACKAGE BIN
#
# A separate target dir keeps its lock and flags apart from the test run's.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: build-static.sh PACKAGE BIN" >&2; exit 64; }
repo=$(cd "$(dirname "$0")/.." && pwd)
target=x86_64-unknown-linux-gnu
dir=$repo/target/guest
(cd "$repo" && CARGO_TARGET_DIR=$dir RUSTFLAGS='-C target-feature=+crt-static' \
    "${CARGO:-cargo}" build --release --target "$target" -p "$1" --bin "$2" >&2)
echo "$dir/$target/release/$2"
