#!/usr/bin/env bash
# The whole test suite once per supported transformers line, each in its own virtual environment:
# .venv (transformers 5.24, requirements.txt) and .venv457 (transformers 4.57.6, requirements-4.57.txt).
# Every line runs even when an earlier one fails; the exit status is non-zero if any failed.
# Extra arguments go to pytest, e.g. `bash tests/matrix.sh tests/test_reliability.py`.
set -uo pipefail
cd "$(dirname "$0")/.."

[ $# -gt 0 ] || set -- tests
failed=()
for venv in .venv .venv457; do
    if ! version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)"); then
        failed+=("$venv (not installed)")
        continue
    fi
    echo "=== $venv: transformers $version"
    "$venv/bin/python" -m pytest -q "$@" || failed+=("$venv (transformers $version)")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED on: ${failed[*]}" >&2
    exit 1
fi
