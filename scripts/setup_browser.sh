#!/usr/bin/env bash
# Headless Chromium from Debian for the Prefect UI test (tests/test_flows.py drives it with Playwright;
# no browser is ever downloaded by Playwright). Skipped when /usr/bin/chromium already exists.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "setup: installing Debian's chromium (apt-get) for the UI test"
$SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || {
  $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends chromium >/dev/null
}
