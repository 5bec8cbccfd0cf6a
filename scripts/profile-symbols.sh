#!/usr/bin/env bash
# Maps a thaw-vmm RIP profile (THAW_VMM_PROFILE=<file>) to guest kernel
# functions with System.map, most sampled first.
#   scripts/profile-symbols.sh PROFILE SYSTEM_MAP [TOP]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 PROFILE SYSTEM_MAP [TOP]" >&2; exit 64; }
profile=$1 map=$2 top=${3:-40}
# Addresses are compared as "x" + 16 hex digits: awk's numbers are doubles,
# too narrow for 64-bit addresses.
awk -v top="$top" '
    function key(s) {
        s = tolower(s); sub(/^0x/, "", s)
        while (length(s) < 16) s = "0" s
        return "x" s
    }
    FNR == NR {
        if ($2 ~ /^[tTwW]$/) { n++; addr[n] = key($1); name[n] = $3 }
        next
    }
    /^#/ { next }
    {
        rip = key($2); total += $1
        if (rip < "xffff800000000000") { hits["<user space>"] += $1; next }
        lo = 1; hi = n; f = "?"
        while (lo <= hi) { mid = int((lo + hi) / 2); if (addr[mid] <= rip) { f = name[mid]; lo = mid + 1 } else hi = mid - 1 }
        hits[f] += $1
    }
    END {
        printf "%d samples\n", total
        for (f in hits) printf "%6.2f%% %7d %s\n", 100 * hits[f] / total, hits[f], f | "sort -rn | head -n " top
    }
' <(sort "$map") "$profile"
