#!/usr/bin/env bash
# Build (or reuse) the emulated aarch64 Debian root filesystem that stands in for a dev board or
# a phone's Linux userland, and the aarch64 wheelhouse the device extra installs from offline.
#
#   android_harness/rootfs.sh [ROOTFS]      default: ~/.cache/fwdllm/arm64-rootfs
#
# Needs root (apt-get, binfmt_misc, debootstrap, chroot). Prints the rootfs path last.
# Reuses a finished rootfs (marker file .fwdllm-rootfs-ready) and an existing wheelhouse.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${FWDLLM_CACHE:-$HOME/.cache/fwdllm}"
ROOTFS="${1:-$CACHE/arm64-rootfs}"
WHEELS="${FWDLLM_ARM64_WHEELS:-$CACHE/arm64-wheels}"
SUITE=bookworm
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

log() { echo "[rootfs] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "rootfs.sh needs root (debootstrap, binfmt_misc, chroot); run it with sudo" >&2
  exit 2
fi

# 1. Host tools.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v update-binfmts >/dev/null; then
  log "installing qemu-user-static debootstrap binfmt-support"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support >&2
fi

# 2. Let the kernel run aarch64 binaries through qemu.
if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >&2 || true
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  echo "binfmt_misc has no qemu-aarch64 entry; install qemu-user-static and binfmt-support" >&2
  exit 2
fi

# 3. The root filesystem (about 3 minutes and 320 MB the first time).
if [ ! -e "$ROOTFS/.fwdllm-rootfs-ready" ]; then
  mirror="$(grep -rhoE '^(URIs:|deb) +[^ ]*' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
            | awk '{print $2}' | grep -m1 -E 'debian/?$' || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
  log "debootstrap --arch=arm64 $SUITE into $ROOTFS from $mirror"
  for m in proc dev sys; do umount "$ROOTFS.partial/$m" "$ROOTFS/$m" 2>/dev/null || true; done
  rm -rf "$ROOTFS.partial"
  mkdir -p "$(dirname "$ROOTFS")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
    "$SUITE" "$ROOTFS.partial" "$mirror" >&2
  rm -rf "$ROOTFS"
  mv "$ROOTFS.partial" "$ROOTFS"
  touch "$ROOTFS/.fwdllm-rootfs-ready"
fi

# 4. The one mount the device side needs: /proc (Python, /proc/meminfo). debootstrap made the
#    /dev nodes (null, zero, urandom); host /dev and /sys stay out, so deleting the root is safe
#    once /proc is unmounted (`umount ROOTFS/proc`).
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"

# 5. aarch64 wheels of the device extra, pinned like the host (constraints.txt), for an
#    offline install on the device. Several manylinux tags: the newest alone misses wheels.
if [ ! -e "$WHEELS/.complete" ]; then
  log "downloading aarch64 cp311 wheels into $WHEELS"
  mkdir -p "$WHEELS"
  reqs="$("$PYTHON" - "$REPO" <<'PY'
import sys, tomllib, pathlib
p = tomllib.loads((pathlib.Path(sys.argv[1]) / "pyproject.toml").read_text())["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["device"]))
PY
)"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q -d "$WHEELS" -c "$REPO/constraints.txt" --only-binary=:all: \
    --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform any \
    $(echo "$reqs" | tr '\n' ' ') >&2
  touch "$WHEELS/.complete"
fi
echo "$ROOTFS"
