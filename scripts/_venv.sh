# Sourced by scripts/test and scripts/demo: make sure .venv exists and holds this project
# (editable) with the test extra. Idempotent and quick: it reinstalls only when pyproject.toml
# changed since the last install (a stamp file records its hash).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

pick_python() {
    for candidate in python3.11 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: Python >= 3.11 is required" >&2
    return 1
}

if [ ! -x "$venv/bin/python" ]; then
    py="$(pick_python)"
    echo "==> creating $venv with $py" >&2
    "$py" -m venv "$venv"
fi

stamp="$venv/.enclave-runtime-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing enclave-runtime (editable) and its test dependencies" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet -e "$root[test]" >&2
    echo "$want" >"$stamp"
fi
export PATH="$venv/bin:$PATH"
# Byte-compiled modules make enclave start-up fast (the machine may set PYTHONDONTWRITEBYTECODE).
unset PYTHONDONTWRITEBYTECODE
