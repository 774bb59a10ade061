#!/usr/bin/env bash
# Installs everything fedsparse needs: the pinned pip requirements (requirements.lock, the exact versions the results
# (README.md, docs/) were made with; requirements.txt keeps the ranges for an environment of your own) into a virtual
# environment and, on Debian or Ubuntu without Fashion-MNIST, the package dataset-fashion-mnist, so that the default
# conf runs offline. Elsewhere, or without the rights to install packages, torchvision downloads the data on the first
# run instead (online).
# The environment is the active one when python3 belongs to a virtual environment, else .venv here, created on the
# first run: the distributions' own Python refuses pip installs outside one (PEP 668, Debian 12, Ubuntu 24.04).
# The README's commands and CI both start with this script.
#   bash setup.sh && . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")"

may_install_packages() {  # apt-get, and the rights to use it: root, or sudo without a password
  command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }
}

install_package() {  # one Debian package, quietly; the package lists are read only when the install needs them
  local as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo -n)
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null 2>&1 ||
    { "${as_root[@]}" apt-get update -qq &&
      "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null; }
}

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
  echo "error: $python not found: install Python 3 (on Debian or Ubuntu: apt-get install python3)" >&2
  exit 1
fi
if "$python" -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then  # not in a virtual environment
  if [ ! -x .venv/bin/python ]; then
    # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) apart from Python, in the package python3-venv
    if ! "$python" -c 'import ensurepip' 2>/dev/null &&
       ! { may_install_packages && install_package python3-venv; }; then
      echo "error: $python cannot create a virtual environment: install python3-venv (sudo apt-get install" \
           "python3-venv), then run bash setup.sh again" >&2
      exit 1
    fi
    "$python" -m venv .venv
  fi
  python=.venv/bin/python
fi
"$python" -m pip install -q -r requirements.lock

data=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$data" ] || ! command -v apt-get >/dev/null; then
  exit 0
fi
if ! may_install_packages; then
  echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist', or let the first" \
       "run download it (online)" >&2
  exit 0
fi
install_package dataset-fashion-mnist ||
  echo "note: could not install dataset-fashion-mnist; the first run will try to download Fashion-MNIST" >&2
