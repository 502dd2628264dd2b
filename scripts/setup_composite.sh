#!/usr/bin/env bash
# Debian's real photographs for the composite world (grain.data.composite, docs/real-photos.md):
# tuxpaint-stamps-default (GPL-2: photo cut-outs with a caption sentence each) and mate-backgrounds (GPL-2+:
# background photos). Installed under /usr/share by apt-get, read there, never copied into the repository.
# Skipped when both are already installed.
set -euo pipefail
if [ -d /usr/share/tuxpaint/stamps ] && [ -d /usr/share/backgrounds/mate/nature ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "setup: installing tuxpaint-stamps-default and mate-backgrounds (apt-get) for the composite world"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends tuxpaint-stamps-default mate-backgrounds >/dev/null 2>&1 || {
  $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends tuxpaint-stamps-default mate-backgrounds >/dev/null
}
