#!/usr/bin/env bash
# The style checks, in seconds: `tools/lint.sh` runs them all, `tools/lint.sh ruff vermin` some.
# `tools/lint.sh --install` first installs only the linters (pyproject.toml's lint extra), as .ci/run does
# before the heavy install; tests/test_style.py runs each check as a test.
set -euo pipefail
cd "$(dirname "$0")/.."

ruff() { python -m ruff check .; }
format() { python -m ruff format --check .; }
snakefmt() { python -m snakefmt --check workflow; }
# the code runs on Python 3.10 (requires-python); vermin reads `.long()` as Python 2's `long`
vermin() { command vermin --target=3.10- --violations --eval-annotations --no-tips --exclude long xmas tests tools; }

CHECKS=(ruff format snakefmt vermin)

if [[ "${1:-}" == "--install" ]]; then
    shift
    python -m pip install -q "tomli>=2; python_version < '3.11'"  # for tools/extra.py on Python 3.10
    python -m pip install -q $(python tools/extra.py lint)
fi
failed=()
for check in "${@:-${CHECKS[@]}}"; do
    if [[ ! " ${CHECKS[*]} " == *" $check "* ]]; then
        echo "tools/lint.sh: no check named '$check' (the checks: ${CHECKS[*]})" >&2
        exit 2
    fi
    echo "== $check" >&2
    "$check" || failed+=("$check")
done
if (( ${#failed[@]} )); then
    echo "tools/lint.sh: failed: ${failed[*]}" >&2
    exit 1
fi
