# Sourced by scripts/piimage and scripts/test: install what piimage needs on a fresh
# Debian/Ubuntu host (apt packages, then a venv from /usr/bin/python3 that can import
# Debian's python3-guestfs), once. Idempotent: a second run only checks.
set -euo pipefail

PIIMAGE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PIIMAGE_VENV:-$PIIMAGE_ROOT/.venv}"

arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
# What `piimage build` needs. The kernel package is for libguestfs's appliance.
RUNTIME_PACKAGES=(
  libguestfs-tools python3-guestfs "linux-image-$arch" qemu-user-static qemu-utils
  binfmt-support xz-utils zstd pigz openssh-client fdisk e2fsprogs dosfstools mtools
  cloud-guest-utils bmap-tools python3-venv ca-certificates
  qemu-system-arm debian-archive-keyring  # piimage rehearse: boots the images, Debian's kernel
)
# What the test suite needs on top: the stand-in image builder, image checkers, and Docker
# (tests/integration/test_docker.py builds and runs the builder image).
TEST_PACKAGES=(mmdebstrap arch-test cpio docker.io)
# Debian's packages for pyproject.toml's dependencies (and the build backend): the Docker
# builder installs piimage from these, without PyPI (`pip install --no-index` there fails if
# this list falls behind pyproject.toml). A host venv takes them from PyPI instead.
PYTHON_PACKAGES=(python3-click python3-jinja2 python3-yaml python3-requests python3-setuptools python3-wheel)

_missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

ensure_packages() {
  local missing
  missing=$(_missing_packages "$@")
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "piimage: these packages are missing: $(echo $missing)" >&2
    echo "piimage: run with sudo to install them, or: sudo apt-get install $(echo $missing)" >&2
    exit 2
  fi
  echo "piimage: installing $(echo $missing) …" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 || true
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $missing >&2
}

ensure_venv() {
  local extras="$1"
  local stamp="$VENV/.piimage-installed$extras"
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import guestfs' 2>/dev/null; then
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  if [ ! -e "$stamp" ] || [ "$PIIMAGE_ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "piimage: installing the Python package into $VENV …" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$PIIMAGE_ROOT$extras" >&2
    touch "$stamp"
  fi
}
