#!/usr/bin/env bash
# Build what the test bed's VM boots: Debian's kernel (downloaded, not installed) and an
# initramfs with busybox, the virtio network modules, the `trellis` binary given, and
# testbed/vm/init. No registry or image is needed; everything comes from Debian's packages.
#
#   testbed/vm/build.sh OUT_DIR TRELLIS_BINARY
#
# OUT_DIR/vmlinuz (and vmlinux, the same kernel uncompressed) and the module tree are kept
# between runs (the kernel is fetched once);
# OUT_DIR/initramfs.cpio is rebuilt whenever the binary or init is newer than it.
set -euo pipefail
out=$(realpath -m "$1")
bin=$(realpath "$2")
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
cd "$out"

need() { command -v "$1" >/dev/null || { echo "build.sh: needs $1 (Debian: apt-get install $2)" >&2; exit 1; }; }
need qemu-system-x86_64 qemu-system-x86
need cpio cpio
need busybox busybox-static
need objcopy binutils
need xz xz-utils

# The kernel: the package linux-image-amd64 depends on today.
if [ ! -f vmlinuz ]; then
  kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
  pkg=$(kernel_pkg)
  # A machine whose package lists were never fetched knows no kernel package yet.
  [ -n "$pkg" ] || { apt-get update -qq >/dev/null 2>&1 || true; pkg=$(kernel_pkg); }
  [ -n "$pkg" ] || { echo "build.sh: cannot find Debian's kernel package" >&2; exit 1; }
  rm -rf kpkg ./*.deb
  apt-get download "$pkg" >/dev/null 2>&1 || (cd /tmp && apt-get download "$pkg" >/dev/null && mv /tmp/"$pkg"_*.deb "$out"/)
  dpkg-deb -x ./"$pkg"_*.deb kpkg
  rm -f ./*.deb
  cp kpkg/boot/vmlinuz-* vmlinuz.tmp && mv vmlinuz.tmp vmlinuz
fi
# The uncompressed kernel (ELF, booted by PVH): TCG need not emulate the XZ decompressor,
# which halves the boot. Debian compresses with XZ; the payload starts at its magic.
if [ ! -f vmlinux ]; then
  off=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' vmlinuz | head -1 | cut -d: -f1)
  if [ -n "$off" ]; then
    tail -c +$((off + 1)) vmlinuz | xz -dc 2>/dev/null > vmlinux.tmp || true
    if [ "$(head -c 4 vmlinux.tmp | od -An -c | tr -d ' ')" = '177ELF' ]; then
      mv vmlinux.tmp vmlinux
    fi
  fi
  rm -f vmlinux.tmp
fi

if [ -f initramfs.cpio ] && [ initramfs.cpio -nt "$bin" ] && [ initramfs.cpio -nt "$here/init" ] \
   && [ initramfs.cpio -nt "$0" ]; then
  exit 0
fi

rm -rf root
mkdir -p root/{bin,sbin,etc,proc,sys,dev,tmp,run,www,modules,lib64,lib/x86_64-linux-gnu,var/lib/trellis}
cp "$(command -v busybox)" root/bin/busybox
for a in $(busybox --list); do
  [ "$a" = busybox ] || ln -sf busybox "root/bin/$a"
done

# Modules for a virtio NIC, in dependency order (from each module's depends= string).
moddir=$(echo kpkg/lib/modules/*)
declare -A done_mods=()
order=()
add_mod() {
  local name=$1 file deps d
  [ -n "${done_mods[$name]:-}" ] && return
  file=$(find "$moddir/kernel" -name "$name.ko" -o -name "${name//_/-}.ko" | head -1)
  [ -n "$file" ] || return 0   # built in
  done_mods[$name]=1
  deps=$(grep -a -o 'depends=[a-z0-9_,-]*' "$file" | head -1 | cut -d= -f2 | tr ',' ' ')
  for d in $deps; do add_mod "$d"; done
  cp "$file" root/modules/
  order+=("$(basename "$file")")
}
for m in virtio virtio_ring virtio_pci virtio_net; do add_mod "$m"; done
printf '%s\n' "${order[@]}" > root/modules/order

# trellis, without debug info, and the libraries it links.
objcopy --strip-debug "$bin" root/bin/trellis
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  cp -L "$lib" "root$lib" 2>/dev/null || { mkdir -p "root$(dirname "$lib")"; cp -L "$lib" "root$lib"; }
done
cp "$here/init" root/init
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet) > initramfs.cpio.tmp
mv initramfs.cpio.tmp initramfs.cpio
rm -rf root
