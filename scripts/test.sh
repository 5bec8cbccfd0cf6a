#!/usr/bin/env bash
# `make test`: every suite, each timed, on both platforms, with a summary.
#
#   scripts/test.sh            all suites, in the order below
#   scripts/test.sh NAME...    only these suites: a name, a platform, or
#                              platform:name as the summary shows them
#
# Platforms:
#   host  this machine's KVM (PVM on our machines: guest kernel code is
#         emulated, guest user code is native);
#   svm   hardware-style KVM (AMD SVM with nested paging) inside a QEMU TCG
#         guest, started by scripts/svm-run: thaw's stock kernel path, the
#         one users on VMX/SVM hardware run.
#
# Everything is built first, on the host and visibly; the suites then run
# the test binaries cargo built, with THAW_TEST_PREBUILT=1, so no suite
# compiles anything (inside the emulated guest that would take very long)
# and an edit to the tree during a run does not change what is tested.
# The two platforms run side by side, each its suites in order (the svm
# guest is one single-threaded QEMU, so it takes one of the machine's
# cores); console lines carry the platform's name. A suite that fails does
# not stop the others; the exit status is 1 if any failed or if a process
# was left behind. A test ignored with a reason that holds only on PVM
# hosts runs on the svm platform (--include-ignored).
#
# On PVM hosts the VM suites run the subset `pvm_tests` and `pvm_env`
# name below, and the summary counts what was left out: guest kernel code
# is emulated there, and since 2026-12-02 about 6.6x slower than before
# (see README, "PVM hosts"), so the whole set would take about four hours.
# Every test runs on svm, and on a host with hardware KVM.
#
#   THAW_TEST_SUITE_LIMIT  seconds one suite may take (default 1800)
#   THAW_TEST_LOGS         where each suite's full log goes (default
#                          target/test-logs)
#   THAW_TEST_PVM_FULL=1   every test on PVM hosts too
#   THAW_TEST_SERIAL=1     one platform after the other
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
logs=${THAW_TEST_LOGS:-$repo/target/test-logs}
limit=${THAW_TEST_SUITE_LIMIT:-1800}
mkdir -p "$logs"

# name | platform | test binaries: package:target (target "unit" = every
# library and binary unit-test executable of the package; package "*" = all
# but thaw-tests, whose tests are end-to-end)
suites=(
    "unit|host|*:unit"
    "agent-host|host|thaw-agent:host_runtime thaw-agent:pid1_smoke"
    "shim-host|host|thaw-tests:unit thaw-tests:harness thaw-tests:errors thaw-tests:host_backend"
    "cli|host|thaw-tests:admin_cli"
    "vmm_boot|host|thaw-tests:vmm_boot"
    "vmm_snapshot|host|thaw-tests:vmm_snapshot"
    "vmm_template|host|thaw-tests:vmm_template"
    "agent_vm|host|thaw-tests:agent_vm"
    "vm|host|thaw-tests:vm"
    "cri|host|thaw-tests:cri"
    "vmm_boot|svm|thaw-tests:vmm_boot"
    "vmm_snapshot|svm|thaw-tests:vmm_snapshot"
    "vmm_template|svm|thaw-tests:vmm_template"
    "agent_vm|svm|thaw-tests:agent_vm"
    "vm|svm|thaw-tests:vm"
    "cri|svm|thaw-tests:cri"
)

# The VM suites' tests that run on PVM hosts (see the header), chosen
# for what differs there: the kernel's PVM workarounds at boot (vmm_boot),
# snapshot and template restore (vmm_snapshot, vmm_template), kvm-clock
# after a restore, a container's life through the shim in a jailed VMM
# (its output, exit codes, a killed VMM), a pod through CRI. A suite not
# named here runs whole; "tests" are libtest names, "env" picks cri's
# checks (the pod lifecycle and the pod's cgroup) and one latency pod.
declare -A pvm_tests=(
    [agent_vm]="a_restored_guest_does_not_count_the_templates_age_in_its_uptime"
    [vm]="vm_run_rm_output_and_exit_codes vm_kill_9_of_the_vmm_gives_exit_255_within_seconds"
)
declare -A pvm_env=(
    [cri]="THAW_CRI_ONLY=pod: THAW_CRI_LATENCY_RUNS=1"
)
pvm_subset=0
if [ -d /sys/module/kvm_pvm ] && [ "${THAW_TEST_PVM_FULL:-0}" != 1 ]; then
    pvm_subset=1
fi
vm_suite() { case $1 in vmm_*|agent_vm|vm|cri) return 0 ;; esac; return 1; }

say() { printf '\n=== %s\n' "$*"; }

selected=("$@")
want() {
    [ ${#selected[@]} -eq 0 ] && return 0
    local s
    for s in "${selected[@]}"; do
        if [ "$s" = "$1" ] || [ "$s" = "$2" ] || [ "$s" = "$2:$1" ]; then return 0; fi
    done
    return 1
}

start_all=$(date +%s)
say "building (host): guest kernel, workspace, test binaries, guest root image"
build_log=$logs/build.log
list=$logs/test-binaries.tsv
(
    set -e
    THAW_KERNEL=$(kernel-config/build.sh)
    cargo build --workspace --all-targets
    # One line per test executable: package, target, kind, path, package dir.
    cargo test --workspace --no-run --message-format=json-render-diagnostics |
        python3 -c 'import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    t = m["target"]
    target = t["name"] if "test" in t["kind"] else "unit"
    pid = m["package_id"]
    frag = pid.split("#")[-1]
    pkg = frag.split("@")[0] if "@" in frag else pid.split("#")[0].rstrip("/").rsplit("/", 1)[-1]
    print(pkg, target, m["executable"], os.path.dirname(m["manifest_path"]), sep="\t")' > "$list.tmp"
    mv "$list.tmp" "$list"
    THAW_ROOT_IMAGE=$(guest-agent/build-rootfs.sh)
    tests/build-static.sh thaw-test-init thaw-test-init >/dev/null
    printf 'THAW_KERNEL=%s\nTHAW_ROOT_IMAGE=%s\n' "$THAW_KERNEL" "$THAW_ROOT_IMAGE" > "$logs/assets"
) 2>&1 | tee "$build_log"
if [ "${PIPESTATUS[0]}" != 0 ]; then
    echo "test.sh: the build failed; no suite ran (log: $build_log)" >&2
    exit 1
fi
# shellcheck disable=SC1091
. "$logs/assets"
export THAW_KERNEL THAW_ROOT_IMAGE THAW_TEST_PREBUILT=1
build_secs=$(( $(date +%s) - start_all ))

# Lines "path<TAB>package dir" of the executables a suite names.
executables() {
    local spec pkg target
    for spec in "$@"; do
        pkg=${spec%%:*} target=${spec#*:}
        awk -F'\t' -v p="$pkg" -v t="$target" \
            '(p == "*" ? $1 != "thaw-tests" : $1 == p) && $2 == t {print $3 "\t" $4}' "$list"
    done
}

# What could be a leak of this run: this tree's binaries, the harness's
# containerd dirs, svm guests.
ours() {
    pgrep -a -f "$repo/target/|/tmp/thaw-e2e-|qemu-system.*svm-run" | grep -v -e pgrep -e 'test\.sh' -e 'cargo ' || true
}
before=$(ours)

# One suite: its log, and a summary line in $logs/results (suite order
# first, so the summary keeps the table's order whatever finishes first).
run_suite() {
    local index=$1 name=$2 platform=$3 specs=$4
    local log=$logs/$platform-$name.log started secs rc r e exe dir
    local -a exes args envs
    say "suite $name on $platform: $specs"
    started=$(date +%s)
    # shellcheck disable=SC2086
    mapfile -t exes < <(executables $specs)
    : > "$log"
    rc=0
    if [ ${#exes[@]} -eq 0 ]; then
        echo "test.sh: no test executable found for $specs" | tee "$log"
        rc=1
    fi
    local subset=""
    args=() envs=()
    if [ "$platform" = host ] && [ "$pvm_subset" = 1 ] && vm_suite "$name"; then
        if [ -n "${pvm_tests[$name]:-}" ]; then
            # shellcheck disable=SC2206
            args=(--exact ${pvm_tests[$name]})
            subset="PVM subset"
        fi
        if [ -n "${pvm_env[$name]:-}" ]; then
            # shellcheck disable=SC2206
            envs=(${pvm_env[$name]})
            subset="PVM subset (${pvm_env[$name]})"
        fi
    fi
    local threads=2
    if [ "$platform" = host ] && [ "$serial" != 1 ] && vm_suite "$name"; then
        # svm's QEMU holds one core: one PVM vCPU at a time on the other.
        threads=1
    fi
    for e in "${exes[@]}"; do
        IFS=$'\t' read -r exe dir <<<"$e"
        if [ "$platform" = svm ]; then
            # Each executable gets a fresh guest: nothing carries over.
            timeout "$limit" scripts/svm-run -t "$limit" -C "$dir" \
                -e THAW_KERNEL -e THAW_ROOT_IMAGE -e THAW_TEST_PREBUILT -e RUST_BACKTRACE -e THAW_CRI_ONLY \
                -- "$exe" --test-threads=1 --color=never --include-ignored 2>&1 | tee -a "$log"
        else
            (cd "$dir" && env "${envs[@]}" timeout "$limit" "$exe" --test-threads="$threads" --color=never "${args[@]}") 2>&1 | tee -a "$log"
        fi
        r=${PIPESTATUS[0]}
        [ "$r" = 0 ] || rc=$r
    done
    secs=$(( $(date +%s) - started ))
    # libtest prints one "test result:" line per executable.
    local passed nfailed ignored filtered verdict last
    read -r passed nfailed ignored filtered < <(
        sed -n 's/.*test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored; [0-9]* measured; \([0-9]*\) filtered out.*/\1 \2 \3 \4/p' "$log" |
            awk '{p+=$1; f+=$2; i+=$3; o+=$4} END {print p+0, f+0, i+0, o+0}')
    verdict=ok
    if [ "$rc" != 0 ] || [ "$nfailed" != 0 ] || [ "$passed" = 0 ]; then
        verdict=FAILED
        [ "$rc" = 124 ] && verdict="FAILED (hit the ${limit} s limit)"
        # The test that was running when the suite ended (one thread:
        # libtest names a test as it starts it).
        last=$(awk '/^test [^ ]+ \.\.\. / {t = $2} /test result:/ {t = ""} END {print t}' "$log")
        [ -n "$last" ] && verdict="$verdict in $last"
        touch "$logs/.failed"
    fi
    if [ -n "$subset" ]; then
        verdict="$verdict; $subset"
        [ "$filtered" != 0 ] && verdict="$verdict, $filtered tests left out"
    fi
    printf '%03d|%-14s %-5s %6s s %5s passed %4s failed %4s ignored  %s\n' \
        "$index" "$name" "$platform" "$secs" "$passed" "$nfailed" "$ignored" "$verdict" >> "$logs/results"
}

# One platform's suites, in order; console lines name the platform.
run_lane() {
    local platform=$1 i name p specs
    for i in "${!suites[@]}"; do
        IFS='|' read -r name p specs <<<"${suites[$i]}"
        [ "$p" = "$platform" ] || continue
        want "$name" "$p" || continue
        run_suite "$i" "$name" "$p" "$specs"
    done 2>&1 | sed -u "s/^/[$platform] /"
}

serial=${THAW_TEST_SERIAL:-0}
rm -f "$logs/results" "$logs/.failed"
if [ "$pvm_subset" = 1 ]; then
    say "PVM host: the VM suites run the subset test.sh names (THAW_TEST_PVM_FULL=1 runs all); svm runs every test"
fi
if [ "$serial" = 1 ]; then
    run_lane host
    run_lane svm
else
    run_lane host &
    run_lane svm &
    wait
fi
failed=0
[ -e "$logs/.failed" ] && failed=1

# Nothing a suite started may outlive it.
# (This tree's binaries, the harness's containerd dirs, the svm guests;
# only processes that were not there before the suites started.)
leftovers=$(ours | grep -v -x -F -f <(printf '%s\n' "$before") || true)
if [ -n "$leftovers" ]; then
    failed=1
    say "left behind after the suites (a leak):"
    echo "$leftovers"
fi

say "summary (logs in $logs)"
printf '%-14s %-5s %6s s\n' build host "$build_secs"
[ -e "$logs/results" ] && sort "$logs/results" | cut -d"|" -f2-
echo "total $(( $(date +%s) - start_all )) s"
exit "$failed"
