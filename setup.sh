#!/usr/bin/env bash
# Installs everything fedsparse needs into the active Python (a virtual environment when one is active, as in .ci/run):
# the pip requirements, and on Debian or Ubuntu without Fashion-MNIST the package dataset-fashion-mnist, so that the
# default conf runs offline. Elsewhere, or without the rights to install packages, torchvision downloads the data on
# the first run instead (online). The README's commands and CI both start with this script.
#   bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
"$python" -m pip install -q -r requirements.txt
data=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$data" ] || ! command -v apt-get >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist', or let the first" \
       "run download it (online)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! "${as_root[@]}" apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
  "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq dataset-fashion-mnist >/dev/null ||
    echo "note: could not install dataset-fashion-mnist; the first run will try to download Fashion-MNIST" >&2
fi
