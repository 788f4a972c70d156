#!/usr/bin/env bash
# The whole test suite once per supported transformers line, each in its own virtual environment:
# .venv (transformers 5.24, requirements.txt) and .venv457 (transformers 4.57.6, requirements-4.57.txt).
# The two lines run at the same time, one torch thread each: the tests are tiny models whose time goes to Python,
# so two single-threaded processes on two cores take about half the wall time of one line after the other. Each
# line's output is kept in a log and printed whole when both are done.
# Without arguments it then runs tests/vllm in .venv-vllm (vLLM serving qwenvl; tests/vllm/run.sh, set up by
# tests/vllm/setup.sh). Every line runs even when another fails; the exit status is non-zero if any failed.
# Extra arguments go to pytest and select the main suite only, e.g. `bash tests/matrix.sh tests/test_reliability.py`.
set -uo pipefail
cd "$(dirname "$0")/.."

with_vllm=0
[ $# -gt 0 ] || { set -- tests; with_vllm=1; }
logs=$(mktemp -d)
failed=()
pids=()
venvs=()
for venv in .venv .venv457; do
    if ! version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)"); then
        failed+=("$venv (not installed)")
        continue
    fi
    echo "=== $venv: transformers $version (started $(date +%T))"
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" \
        >"$logs/${venv#.}.log" 2>&1 &
    pids+=($!)
    venvs+=("$venv (transformers $version)")
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${venvs[$i]}")
done
for i in "${!venvs[@]}"; do
    echo "=== ${venvs[$i]}"
    name=${venvs[$i]%% *}
    cat "$logs/${name#.}.log"
done
rm -rf "$logs"
if [ $with_vllm = 1 ]; then
    echo "=== .venv-vllm: tests/vllm"
    bash tests/vllm/run.sh || failed+=(".venv-vllm (tests/vllm)")
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED on: ${failed[*]}" >&2
    exit 1
fi
