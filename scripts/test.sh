#!/usr/bin/env bash
# Installs everything the tests need and runs every test: Rust (fmt, clippy,
# cargo test) and Python (ruff, pytest against the installed wheel).
# Exits non-zero on any failure, including "no tests collected".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${KDCORE_TEST_VENV:-$root/.venv-test}

echo "== virtualenv $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r scripts/requirements-test.txt

echo "== Rust: fmt, clippy, tests"
export PYO3_PYTHON="$venv/bin/python"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --release

echo "== build and install the wheel"
rm -rf "$root/dist"
"$venv/bin/maturin" build --release --out "$root/dist"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$root"/dist/kdcore-*.whl

echo "== Python: ruff, pytest"
"$venv/bin/ruff" check python tests benches
"$venv/bin/ruff" format --check python tests benches
# Run from tests/ so that the installed package, not the source tree, is imported.
cd "$root/tests"
"$venv/bin/python" -c "import kdcore, sys; print('testing', kdcore.__file__); sys.exit('site-packages' not in kdcore.__file__)"
"$venv/bin/python" -m pytest python -q -p no:cacheprovider "$@"
