#!/usr/bin/env bash
# The measurement report "startup, concurrency and density": the `startup`
# benchmark (benches/benches/startup/) on one or both platforms, writing
# benches/report/startup-<platform>.md and .svg.
#
#   scripts/bench-report.sh [host|svm|all]     (default all: host, then svm)
#
#   host  this machine's KVM (PVM on our machines: report startup-pvm.*)
#   svm   hardware-style KVM inside a QEMU TCG guest (scripts/svm-run):
#         thaw's stock kernel path (report startup-svm.*)
#
# Everything is built first on the host (release VMM and shim, the debug
# harness binaries, the guest kernel and root image, the benchmark binary);
# the benchmark then runs prebuilt (THAW_TEST_PREBUILT=1), as scripts/test.sh
# runs its suites, so nothing compiles inside the emulated guest.
# Installs Debian's gVisor package (runsc) if it is missing. Not run by CI.
#
# Counts (the benchmark's environment; modest defaults here, a cold boot
# takes minutes on PVM):
#   THAW_BENCH_RUNS=10 THAW_BENCH_COLD_RUNS=3 THAW_BENCH_CRI_RUNS=5
#   THAW_BENCH_CONCURRENCY=20 THAW_BENCH_IDLE=3
#   BENCH_REPORT_SVM_LIMIT  seconds the svm run may take (default 5400)
#
# How long (2026-12-01, these defaults, a loaded 2-core machine, templates
# already stored): host (PVM) 12-16 min, svm 6-9 min, guest boot included;
# building first adds a few minutes when the tree changed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
what=${1:-all}
case $what in host|svm|all) ;; *) echo "usage: bench-report.sh [host|svm|all]" >&2; exit 64 ;; esac

export THAW_BENCH_RUNS=${THAW_BENCH_RUNS:-10}
export THAW_BENCH_COLD_RUNS=${THAW_BENCH_COLD_RUNS:-3}
export THAW_BENCH_CRI_RUNS=${THAW_BENCH_CRI_RUNS:-5}
export THAW_BENCH_CONCURRENCY=${THAW_BENCH_CONCURRENCY:-20}
export THAW_BENCH_IDLE=${THAW_BENCH_IDLE:-3}
report_dir=$repo/benches/report
mkdir -p "$report_dir"

if ! [ -x /usr/bin/runsc ]; then
    echo "bench-report.sh: installing Debian's runsc (gVisor)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >&2
fi

echo "=== building (host)" >&2
THAW_KERNEL=$(kernel-config/build.sh)
cargo build --release -p thaw-vmm -p containerd-shim-thaw-v2 >&2
cargo build -p containerd-shim-thaw-v2 -p thaw-agent -p thaw-vmm -p thaw-cli >&2
THAW_ROOT_IMAGE=$(guest-agent/build-rootfs.sh)
exe=$(cargo bench -p thaw-benches --bench startup --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "startup" and m.get("executable"):
        print(m["executable"])' | tail -1)
[ -x "$exe" ] || { echo "bench-report.sh: the startup benchmark did not build" >&2; exit 1; }
export THAW_KERNEL THAW_ROOT_IMAGE THAW_TEST_PREBUILT=1 THAW_BENCH_REPORT_DIR=$report_dir

load() { cut -d' ' -f1-3 /proc/loadavg; }
rc=0

if [ "$what" = host ] || [ "$what" = all ]; then
    echo "=== host: $exe" >&2
    start=$(date +%s)
    (cd "$repo/benches" && "$exe") || rc=$?
    echo "=== host run took $(( $(date +%s) - start )) s (exit $rc)" >&2
fi

if [ "$what" = svm ] || [ "$what" = all ]; then
    echo "=== svm: $exe" >&2
    start=$(date +%s) host_load=$(load) r=0
    THAW_BENCH_PLATFORM=svm scripts/svm-run -t "${BENCH_REPORT_SVM_LIMIT:-5400}" -C "$repo/benches" -o "$report_dir" \
        -e THAW_KERNEL -e THAW_ROOT_IMAGE -e THAW_TEST_PREBUILT -e THAW_BENCH_REPORT_DIR -e THAW_BENCH_PLATFORM \
        -e THAW_BENCH_RUNS -e THAW_BENCH_COLD_RUNS -e THAW_BENCH_CRI_RUNS -e THAW_BENCH_CONCURRENCY -e THAW_BENCH_IDLE \
        -- "$exe" || r=$?
    secs=$(( $(date +%s) - start ))
    echo "=== svm run took $secs s, guest boot included (exit $r)" >&2
    if [ -f "$report_dir/startup-svm.md" ]; then
        # The load the emulator saw: the host's, not the guest's.
        sed -i "0,/^- machine load:/s//- host load average (1\/5\/15 min, the QEMU guest runs on the host's 2 cores): $host_load at the start, $(load) at the end; whole svm-run $secs s, guest boot included\n- machine load:/" \
            "$report_dir/startup-svm.md"
    fi
    [ "$r" = 0 ] || rc=$r
fi
exit "$rc"
