#!/usr/bin/env bash
# Installs what building and testing thaw needs on Debian 12 (as root).
set -euo pipefail
pkgs=(
    linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils kmod
    erofs-utils e2fsprogs busybox-static containerd runc protobuf-compiler
    # CNI plugins (bridge, host-local, loopback) for the CRI suite's pods
    # with a network namespace of their own (tests/tests/cri.rs).
    containernetworking-plugins
    # The boot benchmark's baseline (benches/benches/boot.rs).
    qemu-system-x86
    # The network benchmark's load (benches/benches/net_throughput.rs).
    iperf3
)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -c /dev/kvm ]; then
    echo "install-deps: warning: /dev/kvm is missing; thaw needs KVM" >&2
fi
