#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets in fuzz/, one after the other,
# each for SECONDS (default 60), niced, one job each, and ends with a table
# per target: executions, coverage (cov/ft) and findings (new crash, oom,
# timeout or leak files in fuzz/artifacts/<target>/). Exits non-zero if any
# target found something or failed to run.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# The corpus grows in fuzz/corpus/<target>/ (seeded from fuzz/seeds/<target>/
# when present); logs go to fuzz/target/logs/. All three are gitignored.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=60
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    seconds=$1
    shift
fi
all=$(cargo +nightly fuzz list)
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets <<<"$all"
fi
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$all"; then
        echo "fuzz: no target '$t' (have: $(echo $all))" >&2
        exit 2
    fi
done

export CARGO_INCREMENTAL=0
echo "== fuzz: building ${targets[*]}"
for t in "${targets[@]}"; do
    nice -n 10 cargo +nightly fuzz build -O "$t" || exit 1
done

mkdir -p target/logs
findings_file() { find "artifacts/$1" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) 2>/dev/null | sort; }

declare -A execs cov ft found status
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [[ -d seeds/$t ]] && seeds=("seeds/$t")
    before=$(findings_file "$t")
    log=target/logs/$t.log
    echo "== fuzz: $t for ${seconds}s (log: fuzz/$log)"
    rss=2048
    # mmio_block starts a device thread in most runs, and ASan keeps about
    # 1 KiB for every thread it has seen (measured: a loop that only spawns
    # and joins threads grows the same way): allow 1 MiB per second.
    [[ $t == mmio_block ]] && rss=$((2048 + seconds))
    nice -n 10 cargo +nightly fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb="$rss" \
        -malloc_limit_mb=1024 -timeout=20 >"$log" 2>&1
    rc=$?
    new=$(comm -13 <(echo "$before") <(findings_file "$t") | sed '/^$/d')
    execs[$t]=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    last=$(grep -E '^#[0-9]+.*cov: [0-9]+' "$log" | tail -1)
    cov[$t]=$(grep -oE 'cov: [0-9]+' <<<"$last" | awk '{print $2}')
    ft[$t]=$(grep -oE 'ft: [0-9]+' <<<"$last" | awk '{print $2}')
    [[ -z ${execs[$t]} ]] && execs[$t]=$(grep -oE '^#[0-9]+' <<<"$last" | tr -d '#')
    found[$t]=$new
    status[$t]=$rc
    if [[ -n $new || $rc -ne 0 ]]; then
        failed=1
        echo "fuzz: $t: exit $rc; tail of the log:"
        tail -30 "$log" | sed 's/^/    /'
    fi
done

echo
printf '%-16s %8s %12s %8s %8s  %s\n' target seconds execs cov ft findings
for t in "${targets[@]}"; do
    n=$(sed '/^$/d' <<<"${found[$t]}" | wc -l)
    printf '%-16s %8s %12s %8s %8s  %s\n' "$t" "$seconds" "${execs[$t]:-?}" "${cov[$t]:-?}" \
        "${ft[$t]:-?}" "$n$([[ ${status[$t]} -ne 0 ]] && echo " (exit ${status[$t]})")"
    sed '/^$/d; s|^|    fuzz/|' <<<"${found[$t]}"
done
exit $failed
