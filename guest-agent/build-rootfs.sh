#!/usr/bin/env bash
# Builds thaw's guest root filesystem: a small read-only erofs image holding
# the static thaw-agent as /sbin/init and the empty mount points it needs.
# The guest boots it as virtio-blk with `root=/dev/vda ro rootfstype=erofs
# init=/sbin/init`.
#
# The image is cached outside the repository, keyed by a hash of its inputs
# (the agent binary, this script, the busybox choice). Prints the image path
# on its last line.
#
#   THAW_CACHE              cache root (default /var/cache/thaw)
#   THAW_ROOTFS_BUSYBOX=1   also put /bin/busybox (busybox-static) and /bin/sh
#                           in the image, for debugging
#   THAW_AGENT_BIN=<path>   use this agent binary instead of building one
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${THAW_CACHE:-/var/cache/thaw}
busybox=${THAW_ROOTFS_BUSYBOX:-0}
target=x86_64-unknown-linux-gnu

if [ -n "${THAW_AGENT_BIN:-}" ]; then
    agent=$THAW_AGENT_BIN
else
    # Static glibc binary (no musl target here). RUSTFLAGS with an explicit
    # --target applies to the agent only, not to build scripts.
    # Profile `agent` (workspace Cargo.toml): opt-level s, fat LTO, stripped.
    (cd "$repo" && RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --profile agent -p thaw-agent --target "$target" >&2)
    agent="$repo/target/$target/agent/thaw-agent"
fi
if ! file "$agent" | grep -q 'static'; then
    echo "build-rootfs.sh: $agent is not statically linked" >&2
    exit 1
fi

key=$( { sha256sum < "$agent"; sha256sum < "$here/build-rootfs.sh"; echo "busybox=$busybox";
         if [ "$busybox" = 1 ]; then sha256sum < /bin/busybox; fi; } | sha256sum | cut -c1-16)
out="$cache/rootfs/$key"
if [ -f "$out/rootfs.erofs" ]; then
    echo "guest rootfs: cached ($key), $(stat -c %s "$out/rootfs.erofs") bytes" >&2
    echo "$out/rootfs.erofs"
    exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage" "$out.tmp"' EXIT
mkdir -p "$stage"/{sbin,proc,sys,dev,run,tmp,mnt,etc,var,root}
chmod 0755 "$stage"
chmod 1777 "$stage/tmp"
# Stripped: symbols are of no use in the guest and cost image bytes.
install -m 0755 -s "$agent" "$stage/sbin/thaw-agent"
ln -s thaw-agent "$stage/sbin/init"
: > "$stage/etc/resolv.conf"
# The image is read-only; the agent writes the id the host gives it
# (SetIdentity) to its /run tmpfs.
ln -s ../run/machine-id "$stage/etc/machine-id"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' > "$stage/etc/group"
if [ "$busybox" = 1 ]; then
    mkdir -p "$stage/bin"
    install -m 0755 /bin/busybox "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
fi

mkdir -p "$out.tmp"
# Fixed timestamps, owners and UUID: the same inputs give the same image.
mkfs.erofs --quiet -T0 --all-root -U 6c6f6f6b-7468-6177-2d72-6f6f74667300 \
    "$out.tmp/rootfs.erofs" "$stage" >&2
rm -rf "$out" && mv "$out.tmp" "$out"
echo "guest rootfs: $(stat -c %s "$out/rootfs.erofs") bytes, agent $(stat -c %s "$stage/sbin/thaw-agent") bytes stripped ($key)" >&2
echo "$out/rootfs.erofs"
