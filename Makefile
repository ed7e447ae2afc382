# Every target sources env.sh (if there is one) so DATA_DIR, RESULTS_DIR and threads apply.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ENV := set -a; if [ -f env.sh ]; then . ./env.sh; fi; set +a;
TRAIN := $(PY) src/scripts/train_simple_CNN.py
DEMO := scratch/demo

.PHONY: install test test-fast lint clean demo bench report simple_cnn_cifar10 simple_cnn_cifar100 \
	sweep_lr_width_local sweep_lr_width_slurm

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	[ -f env.sh ] || cp env.sh.example env.sh

test:
	$(PY) -m pytest -q tests

# The unit tests alone, in seconds, for working: every test not marked slow (see tests/conftest.py).
test-fast:
	$(PY) -m pytest -q -m "not slow" tests

lint:
	$(VENV)/bin/ruff check src configs tests

clean:
	rm -rf .pytest_cache .ruff_cache scratch
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

# The speed table of README "Performance"; writes scratch/bench.json. Keep the machine otherwise idle.
bench:
	$(ENV) $(PY) src/scripts/bench.py

# The table of every run under $RESULTS_DIR.
report:
	$(ENV) $(PY) src/scripts/report.py $${RESULTS_DIR:-results}

# Offline: a small learnable CIFAR-10-format archive, a few epochs on it, then its test accuracy.
demo:
	[ -f $(DEMO)/data/cifar-10-python.tar.gz ] || $(PY) -m src.cifar_writer $(DEMO)/data --n-train 5000 --n-test 1000
	DATA_DIR=$(DEMO)/data $(TRAIN) cifar10 $(DEMO)/run --n_epochs=4 --valid_size=500 --n_filters=16
	DATA_DIR=$(DEMO)/data $(PY) src/scripts/evaluate.py $(DEMO)/run

# One target per experiment; rerun a target to resume it.
simple_cnn_cifar10:
	$(ENV) $(TRAIN) cifar10 $${RESULTS_DIR:-results}/simple_cnn_cifar10

simple_cnn_cifar100:
	$(ENV) $(TRAIN) cifar100 $${RESULTS_DIR:-results}/simple_cnn_cifar100

# Example sweeps (widths x learning rates x 3 seeds); rerun a target to resume it.
SWEEP_GRID := --n_filters=16,32,64 --lr=0.1,0.05 --seeds=3
sweep_lr_width_local:
	$(ENV) $(PY) src/scripts/sweep.py cifar10 $${RESULTS_DIR:-results}/lr_width $(SWEEP_GRID) --max_parallel=1

sweep_lr_width_slurm:
	$(ENV) $(PY) src/scripts/sweep.py cifar10 $${RESULTS_DIR:-results}/lr_width $(SWEEP_GRID) --backend=slurm \
		--partition=$${SLURM_PARTITION:-gpu} --time=240 --gpus=1 --cpus=8 --mem=32 --array_parallelism=6
