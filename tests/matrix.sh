#!/usr/bin/env bash
# The whole test suite once per supported transformers line, each in its own virtual environment:
# .venv (transformers 5.24, requirements.txt) and .venv457 (transformers 4.57.6, requirements-4.57.txt).
# Without arguments it then runs tests/vllm in .venv-vllm (vLLM serving qwenvl; tests/vllm/run.sh, set up by
# tests/vllm/setup.sh). Every line runs even when an earlier one fails; the exit status is non-zero if any failed.
# Extra arguments go to pytest and select the main suite only, e.g. `bash tests/matrix.sh tests/test_reliability.py`.
set -uo pipefail
cd "$(dirname "$0")/.."

with_vllm=0
[ $# -gt 0 ] || { set -- tests; with_vllm=1; }
failed=()
for venv in .venv .venv457; do
    if ! version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)"); then
        failed+=("$venv (not installed)")
        continue
    fi
    echo "=== $venv: transformers $version"
    "$venv/bin/python" -m pytest -q "$@" || failed+=("$venv (transformers $version)")
done
if [ $with_vllm = 1 ]; then
    echo "=== .venv-vllm: tests/vllm"
    bash tests/vllm/run.sh || failed+=(".venv-vllm (tests/vllm)")
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED on: ${failed[*]}" >&2
    exit 1
fi
