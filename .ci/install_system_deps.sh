#!/usr/bin/env bash
# Installs the system libraries FFCV's C extension is compiled against (it ships as an sdist only).
# Skips apt-get when every package is already present.
set -euo pipefail
PKGS=(pkg-config g++ libopencv-dev libturbojpeg0-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system deps: all present (${PKGS[*]})"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: FFCV needs these system packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "system deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
