#!/usr/bin/env bash
# Builds thaw's guest kernel (an uncompressed vmlinux) from Debian's
# linux-source-6.1 package, with thaw.config merged over tinyconfig and the
# patches in patches/ applied.
#
# The result is cached outside the repository, keyed by a hash of every input
# (package version, config fragment, patches, this script), and rebuilt only
# when the key changes. Prints the path of vmlinux on its last line.
#
#   THAW_CACHE   cache root (default /var/cache/thaw)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${THAW_CACHE:-/var/cache/thaw}
tarball=/usr/src/linux-source-6.1.tar.xz

if [ ! -f "$tarball" ]; then
    echo "kernel-config/build.sh: $tarball is missing; install Debian's linux-source-6.1" >&2
    exit 1
fi

pkg_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$pkg_version"; cat "$here/build.sh" "$here/thaw.config" "$here"/patches/*.patch; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"

if [ -f "$out/vmlinux" ]; then
    echo "guest kernel: cached ($key), $(stat -c %s "$out/vmlinux") bytes" >&2
    echo "$out/vmlinux"
    exit 0
fi

start=$(date +%s)
tree="$cache/kernel/tree-$key"
rm -rf "$tree" && mkdir -p "$tree"
# Only one source tree is kept: drop the trees of older keys.
find "$cache/kernel" -maxdepth 1 -name 'tree-*' ! -name "tree-$key" -exec rm -rf {} + 2>/dev/null || true

echo "guest kernel: building $key from linux-source $pkg_version" >&2
tar xf "$tarball" -C "$tree" --strip-components=1
cd "$tree"
for p in "$here"/patches/*.patch; do
    patch -p1 --quiet --forward < "$p"
done

make -s tinyconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "$here/thaw.config" >/dev/null
make -s olddefconfig >/dev/null

# A fragment line the kernel's Kconfig dropped is a silent mistake: name it.
missing=0
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    opt=${line%%=*}; val=${line#*=}
    if [ "$val" = n ]; then
        grep -qx "$opt=y" .config && { echo "guest kernel: $opt is still enabled" >&2; missing=1; }
    else
        grep -qxF "$line" .config || { echo "guest kernel: $line did not take" >&2; missing=1; }
    fi
done < "$here/thaw.config"
[ "$missing" = 0 ] || echo "guest kernel: warning: some config lines did not take (see above)" >&2

make -s -j"$(nproc)" vmlinux >&2

mkdir -p "$out.tmp"
cp vmlinux System.map .config "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
end=$(date +%s)
echo "guest kernel: vmlinux $(stat -c %s "$out/vmlinux") bytes, built in $((end - start)) s" >&2
echo "$out/vmlinux"
