#!/usr/bin/env bash
# Installs thaw for containerd: the shim, the VMM, the `thaw` admin CLI,
# the guest agent, the guest kernel, the guest root image and a default
# config.
#
#   PREFIX           install prefix (default /usr/local)
#   DESTDIR          staging root for packaging (default: none)
#   THAW_KERNEL      guest vmlinux to install (default: build it with
#                    kernel-config/build.sh, cached)
#   THAW_ROOT_IMAGE  guest root image to install (default: the one
#                    guest-agent/build-rootfs.sh builds, the recipe the
#                    tests use: the static agent as /sbin/init, cached)
#   CONFIG_DIR       where config.toml goes (default /etc/thaw)
#
# Installed:
#   $PREFIX/bin/containerd-shim-thaw-v2   (containerd finds it in PATH)
#   $PREFIX/bin/thaw-vmm
#   $PREFIX/bin/thaw                      (thaw doctor, thaw templates ...)
#   $PREFIX/bin/thaw-agent                (static; also the root image's init)
#   $PREFIX/share/thaw/vmlinux
#   $PREFIX/share/thaw/root.img
#   $CONFIG_DIR/config.toml               (only if missing)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
prefix=${PREFIX:-/usr/local}
dest=${DESTDIR:-}
config_dir=${CONFIG_DIR:-/etc/thaw}
bin="$dest$prefix/bin"
share="$dest$prefix/share/thaw"
target=x86_64-unknown-linux-gnu

say() { echo "install: $*" >&2; }

cd "$repo"
say "building the shim, the VMM and the thaw CLI (release)"
cargo build --release -p containerd-shim-thaw-v2 -p thaw-vmm -p thaw-cli
# The guest root image and its agent: the one recipe the tests use too
# (guest-agent/build-rootfs.sh: the `agent` profile, static, cached).
say "building the guest agent and its root image (static, erofs, cached)"
built_image=$("$repo/guest-agent/build-rootfs.sh" | tail -n1)
agent="$repo/target/$target/agent/thaw-agent"
root_image=${THAW_ROOT_IMAGE:-$built_image}
[ -f "$root_image" ] || { say "guest root image $root_image not found"; exit 1; }

kernel=${THAW_KERNEL:-}
if [ -z "$kernel" ]; then
    say "building (or reusing) the guest kernel"
    kernel=$("$repo/kernel-config/build.sh" | tail -n1)
fi
[ -f "$kernel" ] || { say "guest kernel $kernel not found"; exit 1; }

install -d "$bin" "$share"
install -m 0755 "$repo/target/release/containerd-shim-thaw-v2" "$bin/"
install -m 0755 "$repo/target/release/thaw-vmm" "$bin/"
install -m 0755 "$repo/target/release/thaw" "$bin/"
install -m 0755 "$agent" "$bin/thaw-agent"
install -m 0644 "$kernel" "$share/vmlinux"
install -m 0644 "$root_image" "$share/root.img"

if [ ! -f "$dest$config_dir/config.toml" ]; then
    install -d "$dest$config_dir"
    cat >"$dest$config_dir/config.toml" <<EOF
# thaw shim configuration; every key is optional (defaults shown).
backend = "vm"
state_dir = "/var/lib/thaw"
run_dir = "/run/thaw"
log_level = "info"

[vm]
vmm = "$prefix/bin/thaw-vmm"
kernel = "$prefix/share/thaw/vmlinux"
root_image = "$prefix/share/thaw/root.img"
vcpus = 1
memory_mib = 256
kernel_append = ""
spare_disks = 8
boot_timeout_secs = 120
serial = "none"
max_vcpus = 8
max_memory_mib = 16384

[agent]
request_timeout_secs = 60

[image_cache]
keep_unused_mib = 2048
mkfs_erofs = "mkfs.erofs"

[annotations]
allow = ["vcpus", "memory_mib"]
EOF
    say "wrote $dest$config_dir/config.toml"
else
    say "kept existing $dest$config_dir/config.toml"
fi

say "done. Check the host: $prefix/bin/thaw doctor"
say "Build the default template ahead of the first start: $prefix/bin/thaw templates build"
say "Try: ctr run --rm --runtime io.containerd.thaw.v2 docker.io/library/busybox:latest t1 echo hi"
say "For Kubernetes, add the containerd snippet from shim/README.md and restart containerd."
