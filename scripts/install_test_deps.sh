#!/usr/bin/env bash
# Install what the streaming tests need outside Python, once; later runs find it and do nothing.
#   - Debian's chromium and chromium-driver, and firefox-esr (the browser tests, driven over
#     CDP, playwright-core and WebDriver BiDi), when missing and this runs as root with apt-get;
#   - the official JavaScript client replicate@1.4.0 and playwright-core into .cache/node
#     (tests/test_js_client.py, tests/js/*.mjs), when node and npm exist.
# Playwright's own browser download is never used: it drives the Debian chromium.
# Called by scripts/test before pytest. Without node the JS and browser tests skip and say so;
# with node but without chromium the browser test fails and says how to install it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_DIR="${REPLICANT_NODE_DIR:-$ROOT/.cache/node}"
REPLICATE_JS_VERSION="1.4.0"
PLAYWRIGHT_CORE_VERSION="1.65.1"

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
command -v firefox-esr >/dev/null 2>&1 || command -v firefox >/dev/null 2>&1 ||
    missing+=(firefox-esr)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing ${missing[*]} (apt-get)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    else
        echo "==> ${missing[*]} missing and cannot be installed here (needs root and apt-get):" \
            "install these Debian packages" >&2
    fi
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "==> node/npm not found: the JavaScript-client and browser tests will be skipped" >&2
    exit 0
fi

installed_version() {
    # The version of an npm package in NODE_DIR, or nothing.
    local manifest="$NODE_DIR/node_modules/$1/package.json"
    [ -f "$manifest" ] && node -p "require(process.argv[1]).version" "$manifest" 2>/dev/null || true
}

if [ "$(installed_version replicate)" != "$REPLICATE_JS_VERSION" ] ||
    [ "$(installed_version playwright-core)" != "$PLAYWRIGHT_CORE_VERSION" ]; then
    echo "==> installing replicate@$REPLICATE_JS_VERSION and" \
        "playwright-core@$PLAYWRIGHT_CORE_VERSION into $NODE_DIR" >&2
    mkdir -p "$NODE_DIR"
    if [ ! -f "$NODE_DIR/package.json" ]; then
        echo '{"name": "replicant-test-deps", "private": true}' >"$NODE_DIR/package.json"
    fi
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$NODE_DIR" --no-audit --no-fund \
        --loglevel=error "replicate@$REPLICATE_JS_VERSION" \
        "playwright-core@$PLAYWRIGHT_CORE_VERSION" >&2
fi
