# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kscale-installed
export KSCALE_CACHE ?= $(CURDIR)/.cache/kscale
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup constraints demo demo-bias test test-slow test-all test-cluster test-nodes test-extended golden bench clean-runs

# The versions the suite last passed with (`make constraints` writes them from .venv). pyproject.toml keeps
# ranges for users; set-up installs within them at these versions, so that a new upstream release (transformers
# 5.25 changed Qwen3-VL's video tokens) cannot turn CI red overnight. `make test VENV=.venv-latest
# CONSTRAINTS=/dev/null` runs the suite on the newest releases instead.
CONSTRAINTS ?= constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c $(CONSTRAINTS) -e ".[train,analysis,dev,eval]"
	# lmms-eval declares ~50 requirements (wandb, opencv, another torch, ...): without them; the eval extra
	# above holds what its evaluator, task loader and model base class import
	$(PIP) install -q --disable-pip-version-check --no-deps lmms-eval==0.7.3
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/kscale submit jobs/demo.yaml
	@if [ -f jobs/demo_analyze.yaml ]; then $(VENV)/bin/kscale submit jobs/demo_analyze.yaml; fi

demo-bias: setup
	$(VENV)/bin/kscale submit jobs/demo_bias.yaml

test: setup
	$(PY) -m pytest -q -ra

# Heavier tests of paths the default suite also covers more cheaply (marker `extended`): kept out of
# `make test` so that it stays near 15 minutes; CI runs them after it (.ci/run).
test-extended: setup
	$(PY) -m pytest -q -ra -m "extended and not gpu and not slow"

test-slow: setup
	$(PY) -m pytest -q -ra -m slow

test-all: setup
	$(PY) -m pytest -q -ra -m "not gpu"

test-cluster: setup
	$(PY) -m pytest -q -ra -m cluster tests/cluster

# The multi-node tests (several Ray nodes, a two-node Slurm, a lost head): slow, so not in `make test`; CI runs
# them after it (.ci/run).
test-nodes: setup
	$(PY) -m pytest -q -ra -m "cluster and slow" tests/cluster

constraints: setup
	$(PIP) freeze --disable-pip-version-check --exclude-editable | grep -v -e '^torch==' -e '^lmms[-_]eval==' > $(CONSTRAINTS)

golden: setup
	KSCALE_UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/unit/executors

bench: setup
	$(PY) bench/extract_overhead.py
	@for b in bench/mmd.py bench/attention_overhead.py bench/malora.py bench/bias.py bench/scale.py; do \
		if [ -f $$b ]; then echo "== $$b"; $(PY) $$b || exit 1; fi; done

clean-runs:
	rm -rf runs
