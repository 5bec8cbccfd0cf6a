#!/usr/bin/env bash
# The main job for a newcomer: build what is needed, start a private
# containerd, run containers in thaw micro-VMs, print what happened and how
# long it took. Implemented by the thaw-demo binary (tests/src/bin), which
# reuses the end-to-end test harness.
set -euo pipefail
cd "$(dirname "$0")/.."
export THAW_KERNEL="$(kernel-config/build.sh)"
exec cargo run --quiet -p thaw-tests --bin thaw-demo -- "$@"
