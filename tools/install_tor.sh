#!/usr/bin/env bash
# Install Debian's `tor` package for the real-tor interop test (tests/test_tor_interop.py),
# without letting the package start the system tor service (which would dial the Internet).
# Idempotent: does nothing when `tor` is already on PATH. Needs root (CI runs as root).
set -euo pipefail
if command -v tor >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_tor: tor is not installed and this is not root; run: sudo $0" >&2
  exit 1
fi
# policy-rc.d exiting 101 forbids invoke-rc.d from starting services during the install.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tor >&2
command -v tor >/dev/null 2>&1 || { echo "install_tor: tor still not on PATH" >&2; exit 1; }
tor --version | head -n 1
