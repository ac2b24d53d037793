# sentiment: fine-tune BERT on IMDb with a plain-PyTorch loop.
#   make train ARGS="--epochs 1"    the tutorial run (installs first)
#   make pretrain ARGS="..."        masked-LM further pre-training on unlabeled text (see README)
#   make test                       the test suite, offline, CPU (installs first)
#   make test-gpu                   only the tests that need a CUDA GPU (fp32/bf16/fp16, compile, NCCL, MFU, OOM)
#   make smoke                      a tiny random model end to end, offline, in seconds
#   make ddp NPROC=2 ARGS="..."     the same training under torchrun (DDP)
#   make bench / make compare       speed against the HF Trainer / per-step parity with it
#   make bench-gpu BENCH_OUT=DIR    the same on a GPU: bert-base, MFU, ~6 minutes (README "On a GPU")
#   make seeds ARGS="--seeds 1,2,3 -- FLAGS"   one training per seed, then mean ± std of the test metrics
#   make gpu-prepare / make gpu-check OUT=DIR    every GPU path and recipe in one ~10-minute go (see README "On a GPU")
# Everything lives in a virtual environment ($(VENV)); point VENV at an existing one to reuse it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install when the environment has none. On PyPI torch==2.13.0 is the CUDA 12 build
# for Linux; pick another with e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
ARGS ?=
NPROC ?= 2
SHARED ?= ../shared/imdb
DATA ?= runs/imdb_split
RUN ?= runs/latest

.PHONY: install install-test train pretrain test test-gpu smoke ddp bench compare seeds data plot clean \
	gpu-prepare gpu-check bench-gpu

$(PY):
	$(PYTHON) -m venv $(VENV)

# Metadata lives in setup.cfg; pyproject.toml only names the build backend (setuptools>=70.1, which
# builds wheels without the separate `wheel` package), so pip's build isolation fetches a new enough
# setuptools whatever the environment has. -e: code changes apply without reinstalling.
$(VENV)/.installed: setup.cfg pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[extras]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

train: install
	$(PY) -m sentiment train $(ARGS)

pretrain: install
	$(PY) -m sentiment pretrain $(ARGS)

test: install-test
	$(PY) -m pytest -q tests

# The @pytest.mark.gpu tests alone (tests/test_gpu.py), on the CUDA device this machine has; without one
# they skip (-rs prints why). `make test` runs them too, so on a GPU machine it covers both.
test-gpu: install-test
	$(PY) -m pytest -q -rs -m gpu tests

smoke: install
	rm -rf runs/smoke
	$(PY) -m sentiment.tiny runs/smoke/tiny
	$(PY) -m sentiment train --model_name_or_path runs/smoke/tiny/model --data_dir runs/smoke/tiny/data \
		--n_train 0 --n_test 0 --val_fraction 0.25 --max_length 64 --epochs 10 --lr 3e-3 \
		--output_dir runs/smoke/run --log_every 10 $(ARGS)
	$(PY) -m sentiment predict --model_name_or_path runs/smoke/run/model "A wonderful, moving film." "Awful and boring."

ddp: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m sentiment train $(ARGS)

# A held-out test file carved from ../shared's train split (which has no test split on purpose).
data: install
	$(PY) scripts/split_data.py --input $(SHARED)/train.parquet --output_dir $(DATA)

bench: install-test
	$(PY) scripts/benchmark.py $(ARGS)

compare: install-test
	$(PY) scripts/compare_with_trainer.py $(ARGS)

seeds: install
	$(PY) scripts/seeds.py $(ARGS)

# The GPU figures (scripts/gpu_check.py): gpu-prepare fills the git-ignored .gpu/ here (data, MiniLM, wheels; ~60 MB,
# what a device call can carry); gpu-check runs every step into OUT/summary.md, from the folder CARRY when set. No
# install step: on the lent GPU machine the image's python3 has torch: `make gpu-check PY=python3 CARRY=.gpu OUT=$OUT`.
OUT ?= runs/gpu_check_out
CARRY ?=
gpu-prepare: install-test
	$(PY) scripts/gpu_prepare.py prepare .gpu $(ARGS)

gpu-check:
	$(PY) scripts/gpu_check.py $(if $(CARRY),--data $(CARRY)/imdb --model $(CARRY)/minilm --wheels $(CARRY)/wheels) \
		$(ARGS) $(OUT)

# scripts/bench_gpu.py: the tutorial recipe and a full-data epoch of bert-base's architecture, inference and our paths'
# accuracy, ours against the Trainer, each contender time-boxed, bench.md and bench.json into BENCH_OUT (--quick: the
# tiny model on the CPU, about a minute). No install step, as gpu-check: `make bench-gpu PY=python3 CARRY=.gpu BENCH_OUT=$OUT`.
BENCH_OUT ?= runs/bench_gpu_out
bench-gpu:
	$(PY) scripts/bench_gpu.py $(if $(CARRY),--data $(CARRY)/imdb --model $(CARRY)/minilm --wheels $(CARRY)/wheels) \
		$(ARGS) $(BENCH_OUT)

plot: install
	$(PY) -m sentiment plot $(RUN)

clean:
	rm -rf runs/smoke .pytest_cache
