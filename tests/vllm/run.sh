#!/usr/bin/env bash
# Runs tests/vllm in .venv-vllm (built by tests/vllm/setup.sh). Where vLLM could not be installed, setup.sh left
# .venv-vllm/UNAVAILABLE with the reason: the run is skipped with that message and exits 0.
# Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/../.."

VENV=.venv-vllm
if [ -f "$VENV/UNAVAILABLE" ]; then
    echo "SKIPPED tests/vllm: vLLM is not available here ($(cat "$VENV/UNAVAILABLE")); run tests/vllm/setup.sh"
    exit 0
fi
if [ ! -f "$VENV/READY" ]; then
    echo "tests/vllm: $VENV is missing; run bash tests/vllm/setup.sh first" >&2
    exit 1
fi
# Offline: the model is a local directory, and nothing may reach the Hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
