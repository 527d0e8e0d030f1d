#!/usr/bin/env bash
# Install the external servers and system packages the integration tests use.
#
#   - azurite (Azure Blob emulator) from npm into ./.test-tools (gitignored);
#   - when running as root with apt available: etcd, fuse3 and what builds pyfuse3, rclone, fio.
#
# Idempotent and quick when everything is already present. Python packages come from
# `pip install -e .[dev]`, not from here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.test-tools"
AZURITE_SPEC="${AZURITE_SPEC:-azurite@3}"
# pkg-config, gcc and python3-dev build pyfuse3 (the FUSE binding ships as source only).
APT_PACKAGES=(etcd-server etcd-client fuse3 libfuse3-dev pkg-config gcc python3-dev rclone fio)

note() { printf 'install-test-deps: %s\n' "$*" >&2; }

install_azurite() {
    if [ -x "$TOOLS/node_modules/.bin/azurite-blob" ]; then
        note "azurite already installed ($("$TOOLS/node_modules/.bin/azurite-blob" --version 2>/dev/null || echo '?'))"
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        note "npm not found: install Node.js >= 18 to get azurite (Azure integration tests will skip)"
        return 1
    fi
    note "installing $AZURITE_SPEC into $TOOLS"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error "$AZURITE_SPEC"
    "$TOOLS/node_modules/.bin/azurite-blob" --version >/dev/null
}

install_apt_packages() {
    local missing=()
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        note "system packages already installed: ${APT_PACKAGES[*]}"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        note "apt-get not available: install ${missing[*]} by other means (etcd and FUSE tests will skip)"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        note "not root: run 'sudo apt-get install ${missing[*]}' (etcd and FUSE tests will skip)"
        return 0
    fi
    note "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

status=0
install_azurite || status=1
install_apt_packages || status=1
exit "$status"
