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
# A suite that fails does not stop the others; the exit status is 1 if any
# failed or if a process was left behind. Nothing is opt-in: a suite that
# cannot run here fails and says why. A test ignored with a reason that
# holds only on PVM hosts runs on the svm platform (--include-ignored).
#
#   THAW_TEST_SUITE_LIMIT  seconds one suite may take (default 1800)
#   THAW_TEST_LOGS         where each suite's full log goes (default
#                          target/test-logs)
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

results=()
failed=0
for entry in "${suites[@]}"; do
    IFS='|' read -r name platform specs <<<"$entry"
    want "$name" "$platform" || continue
    log=$logs/$platform-$name.log
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
    for e in "${exes[@]}"; do
        IFS=$'\t' read -r exe dir <<<"$e"
        if [ "$platform" = svm ]; then
            # Each executable gets a fresh guest: nothing carries over.
            timeout "$limit" scripts/svm-run -t "$limit" -C "$dir" \
                -e THAW_KERNEL -e THAW_ROOT_IMAGE -e THAW_TEST_PREBUILT -e RUST_BACKTRACE -e THAW_CRI_ONLY \
                -- "$exe" --test-threads=1 --color=never --include-ignored 2>&1 | tee -a "$log"
        else
            (cd "$dir" && timeout "$limit" "$exe" --test-threads=2 --color=never) 2>&1 | tee -a "$log"
        fi
        r=${PIPESTATUS[0]}
        [ "$r" = 0 ] || rc=$r
    done
    secs=$(( $(date +%s) - started ))
    # libtest prints one "test result:" line per executable.
    read -r passed nfailed ignored < <(
        sed -n 's/.*test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log" |
            awk '{p+=$1; f+=$2; i+=$3} END {print p+0, f+0, i+0}')
    verdict=ok
    if [ "$rc" != 0 ] || [ "$nfailed" != 0 ] || [ "$passed" = 0 ]; then
        verdict=FAILED
        failed=1
        [ "$rc" = 124 ] && verdict="FAILED (hit the ${limit} s limit)"
        # The test that was running when the suite ended (one thread:
        # libtest names a test as it starts it).
        last=$(awk '/^test [^ ]+ \.\.\. / {t = $2} /test result:/ {t = ""} END {print t}' "$log")
        [ -n "$last" ] && verdict="$verdict in $last"
    fi
    results+=("$(printf '%-14s %-5s %6s s %5s passed %4s failed %4s ignored  %s' \
        "$name" "$platform" "$secs" "$passed" "$nfailed" "$ignored" "$verdict")")
done

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
for r in "${results[@]}"; do echo "$r"; done
echo "total $(( $(date +%s) - start_all )) s"
exit "$failed"
