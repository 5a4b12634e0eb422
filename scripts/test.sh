#!/usr/bin/env bash
# Installs everything the tests need and runs every test: Rust (fmt, clippy,
# cargo test), the release artefacts (a manylinux abi3 wheel and an sdist),
# Python (ruff, pytest against the installed wheel), and the package as a user
# gets it (a clean virtualenv with the wheel and its declared dependencies only).
# Exits non-zero on any failure, including "no tests collected".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${KDCORE_TEST_VENV:-$root/.venv-test}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/kdcore-test.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

echo "== virtualenv $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r scripts/requirements-test.txt
# The hf extra's tests (kdcore.integrations) import these at module level: a
# missing one fails here, never as a silently skipped test.
"$venv/bin/python" -c "import transformers, trl, datasets, accelerate"

echo "== Rust: fmt, clippy, tests"
export PYO3_PYTHON="$venv/bin/python"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --release

echo "== build: manylinux abi3 wheel (compliance checked by maturin) and sdist"
rm -rf "$root/dist"
# zig links against glibc 2.28, so the wheel runs on older systems than this one.
PATH="$venv/bin:$PATH" "$venv/bin/maturin" build --release --zig \
    --compatibility manylinux_2_28 --out "$root/dist"
"$venv/bin/maturin" sdist --out "$root/dist"
wheel=$(ls "$root"/dist/kdcore-*-abi3-manylinux*.whl)
sdist=$(ls "$root"/dist/kdcore-*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"

echo "== Python: ruff, pytest"
"$venv/bin/ruff" check python tests benches scripts
"$venv/bin/ruff" format --check python tests benches scripts
# Run from tests/ so that the installed package, not the source tree, is imported.
(
    cd "$root/tests"
    "$venv/bin/python" -c "import kdcore, sys; print('testing', kdcore.__file__); sys.exit('site-packages' not in kdcore.__file__)"
    "$venv/bin/python" -m pytest python -q -p no:cacheprovider "$@"
)

echo "== as a user: a clean virtualenv with the wheel and its declared dependencies"
user="$scratch/user-venv"
python3 -m venv "$user"
"$user/bin/python" -m pip install -q --upgrade pip
"$user/bin/python" -m pip install -q "$wheel"
cd "$scratch"  # nothing of the source tree on the path
"$user/bin/python" "$root/scripts/check_install.py"
status=0
"$user/bin/kdcore" demo --quick --out "$scratch/demo" 2> "$scratch/demo.err" || status=$?
cat "$scratch/demo.err" >&2
[ "$status" -eq 0 ]
test -s "$scratch/demo/summary.json"
grep -q 'no figure: matplotlib is not installed (pip install "kdcore\[plot\]"' "$scratch/demo.err"
test ! -e "$scratch/demo/demo.png"
echo "-- the plot extra draws the figure of that run"
"$user/bin/python" -m pip install -q "${wheel}[plot]"
"$user/bin/kdcore" plot "$scratch/demo/summary.json"
"$user/bin/python" - "$scratch/demo/demo.png" <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
assert b"tEXtSoftware\x00Matplotlib" in data, "the PNG does not come from matplotlib"
print("demo.png drawn by matplotlib,", len(data), "bytes")
EOF
echo "-- the hf extra brings what kdcore.integrations imports"
"$user/bin/python" -m pip install -q "${wheel}[hf]"
"$user/bin/python" -c "import kdcore.integrations.trl, kdcore.integrations.transformers"
cd "$root"

echo "== the sdist builds from source"
"$venv/bin/python" -m pip wheel -q --no-deps "$sdist" -w "$scratch/from-sdist"
ls "$scratch"/from-sdist/kdcore-*.whl
echo "== all checks passed"
