# Every target sources env.sh (if there is one) so DATA_DIR, RESULTS_DIR and threads apply.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ENV := set -a; if [ -f env.sh ]; then . ./env.sh; fi; set +a;
TRAIN := $(PY) src/scripts/train_simple_CNN.py
DEMO := scratch/demo
# The reference models' named configs (README "Models", docs/models.md), one make target each, by their family's runner.
RESNETS := resnet20 resnet32 resnet44 resnet56 resnet110
WRNS := wrn_16_4 wrn_16_4_cifar100 wrn_28_10 wrn_28_10_cifar100
PREACT_RESNETS := preact_resnet18
VGGS := vgg11_bn vgg16_bn
FASTS := fast airbench94 airbench94_muon speedrun

.PHONY: install test test-fast lint clean demo bench bench-epoch report simple_cnn_cifar10 simple_cnn_cifar100 \
	sweep_lr_width_local sweep_lr_width_slurm $(RESNETS) $(WRNS) $(PREACT_RESNETS) $(VGGS) $(FASTS) sweep_resnets

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	[ -f env.sh ] || cp env.sh.example env.sh

# Both cores: one pytest worker each, whole test files per worker (their session fixtures stay shared);
# 6.4 min in one process, 4.9 min in two, on this project's 2-core machine.
test:
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The unit tests alone, in seconds, for working: every test not marked slow (see tests/conftest.py).
test-fast:
	$(PY) -m pytest -q -m "not slow" tests

# ruff, then the import graph's contracts in pyproject.toml (layers, no cycles; docs/design.md).
lint:
	$(VENV)/bin/ruff check src configs tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf .pytest_cache .ruff_cache scratch
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

# The speed tables of docs/performance.md and docs/models.md; writes scratch/bench.json and scratch/bench_models.json.
# Keep the machine otherwise idle.
bench:
	$(ENV) $(PY) src/scripts/bench.py
	$(ENV) $(PY) src/scripts/bench_models.py

# The outside check of docs/performance.md: one steady epoch of the runner, timed from outside (whole processes),
# against the fastest bare step; writes scratch/bench_epoch.json (about 12 minutes on a 2-core AVX2 CPU).
bench-epoch:
	$(ENV) $(PY) src/scripts/bench_epoch.py

# The table of every run under $RESULTS_DIR.
report:
	$(ENV) $(PY) src/scripts/report.py $${RESULTS_DIR:-results}

# Offline: a small learnable CIFAR-10-format archive, a few epochs on it, then its test accuracy.
demo:
	[ -f $(DEMO)/data/cifar-10-python.tar.gz ] || $(PY) -m src.datasets.writer $(DEMO)/data --n-train 5000 --n-test 1000
	DATA_DIR=$(DEMO)/data $(TRAIN) cifar10 $(DEMO)/run --n_epochs=4 --valid_size=500 --n_filters=16
	DATA_DIR=$(DEMO)/data $(PY) src/scripts/evaluate.py $(DEMO)/run

# One target per experiment; rerun a target to resume it.
simple_cnn_cifar10:
	$(ENV) $(TRAIN) cifar10 $${RESULTS_DIR:-results}/simple_cnn_cifar10

simple_cnn_cifar100:
	$(ENV) $(TRAIN) cifar100 $${RESULTS_DIR:-results}/simple_cnn_cifar100

# The reference models with their papers' recipes, each into $RESULTS_DIR/<config name>; rerun to resume.
$(RESNETS):
	$(ENV) $(PY) src/scripts/train_resnet.py $@ $${RESULTS_DIR:-results}/$@

$(WRNS):
	$(ENV) $(PY) src/scripts/train_wrn.py $@ $${RESULTS_DIR:-results}/$@

$(PREACT_RESNETS):
	$(ENV) $(PY) src/scripts/train_preact_resnet.py $@ $${RESULTS_DIR:-results}/$@

$(VGGS):
	$(ENV) $(PY) src/scripts/train_vgg.py $@ $${RESULTS_DIR:-results}/$@

# The speed-record recipe (docs/models.md, "A speed-record recipe"); its test accuracy: evaluate.py SAVE_PATH --tta=flip.
$(FASTS):
	$(ENV) $(PY) src/scripts/train_fast.py $@ $${RESULTS_DIR:-results}/$@

# He et al.'s Table 6 rows ResNet-20/32/44/56 x 3 seeds, from the resnet20 recipe; rerun to resume. On a
# cluster: make sweep_resnets SWEEP_BACKEND="--backend=slurm --partition=gpu --time=240 --gpus=1 --cpus=8"
SWEEP_BACKEND ?= --max_parallel=1
sweep_resnets:
	$(ENV) $(PY) src/scripts/sweep.py resnet20 $${RESULTS_DIR:-results}/resnets --depth=20,32,44,56 --seeds=3 \
		$(SWEEP_BACKEND)

# Example sweeps (widths x learning rates x 3 seeds); rerun a target to resume it.
SWEEP_GRID := --n_filters=16,32,64 --lr=0.1,0.05 --seeds=3
sweep_lr_width_local:
	$(ENV) $(PY) src/scripts/sweep.py cifar10 $${RESULTS_DIR:-results}/lr_width $(SWEEP_GRID) --max_parallel=1

sweep_lr_width_slurm:
	$(ENV) $(PY) src/scripts/sweep.py cifar10 $${RESULTS_DIR:-results}/lr_width $(SWEEP_GRID) --backend=slurm \
		--partition=$${SLURM_PARTITION:-gpu} --time=240 --gpus=1 --cpus=8 --mem=32 --array_parallelism=6
