#!/usr/bin/env bash
# The main job for a newcomer: build what is needed, start a private
# containerd, run containers in thaw micro-VMs, print what happened and how
# long it took. Every build step prints its progress here; the run itself
# is the thaw-demo binary (tests/src/bin), which reuses the end-to-end test
# harness with the binaries built below.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== demo: %s\n' "$*"; }
# Runs a quiet build step with a line every 30 s, so a long one shows it is alive.
with_ticker() {
    local what=$1 started pid
    shift
    started=$(date +%s)
    ( while sleep 30; do echo "demo: still $what ($(( $(date +%s) - started )) s)" >&2; done ) &
    pid=$!
    "$@"
    local rc=$?
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return "$rc"
}
t0=$(date +%s)

step "1/4 guest kernel (cached after the first build; the first takes 5-15 min on 2 cores)"
THAW_KERNEL=$(with_ticker "building the guest kernel" kernel-config/build.sh)
step "2/4 shim, thaw-vmm and the demo (cargo build)"
cargo build -p containerd-shim-thaw-v2 -p thaw-vmm -p thaw-agent -p thaw-tests --bin thaw-demo
step "3/4 guest root image (static thaw-agent in an erofs image, cached)"
THAW_ROOT_IMAGE=$(with_ticker "building the guest root image" guest-agent/build-rootfs.sh)
step "4/4 the demo (built in $(( $(date +%s) - t0 )) s)"
export THAW_KERNEL THAW_ROOT_IMAGE THAW_TEST_PREBUILT=1
exec target/debug/thaw-demo "$@"
