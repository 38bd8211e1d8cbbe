# Two commands do all set-up on a fresh machine (see README.md):
#   make cluster   # a real local cluster: lte-server + 3 lte-worker processes, dashboard URL printed
#   make test      # the whole test suite
#   make test-fast # the unit tests only (no processes, no servers)
# Both create .venv and install what they need first. PYTHON may point at any Python >= 3.10.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# apt waits up to 10 minutes for another apt/dpkg (a fresh machine's unattended upgrades) to let
# go of its lock, instead of failing at once with "Could not get lock /var/lib/dpkg/lock-frontend"
APT := $(SUDO) apt-get -o DPkg::Lock::Timeout=600

.PHONY: cluster lm-cluster screenshot test test-fast install data data-kjv browser lint proto-check typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Strict editable mode lays the package out as lte/... links under build/, so IDEs, type checkers
# and structure tools see lte.common etc. (the default mode maps them through an import hook).
# A link tree does not see new files: adding or removing a module relinks (the folders' mtimes).
EDITABLE := --config-settings editable_mode=strict
PACKAGE_DIRS := lte_pkg common common/core common/data common/job common/wire commands server server/static worker proto proto/lte/v1

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CPU) || $(BIN)/pip install -q "torch>=2.2" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[dev]" $(EDITABLE)
	touch $@ $(VENV)/.linked

$(VENV)/.linked: $(VENV)/.installed $(PACKAGE_DIRS)
	$(BIN)/pip install -q --no-deps -e . $(EDITABLE)
	touch $@

install: $(VENV)/.installed $(VENV)/.linked

$(FASHION_MNIST):
	@command -v apt-get >/dev/null || { echo "install Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist (Debian: dataset-fashion-mnist)"; exit 1; }
	$(APT) update -qq && $(APT) install -y -qq dataset-fashion-mnist

data: $(FASHION_MNIST)

# the dashboard's browser test drives Debian's chromium through playwright (no browser download)
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install chromium at $(CHROMIUM) for the browser test"; exit 1; }
	$(APT) update -qq && $(APT) install -y -qq chromium

browser: $(CHROMIUM)

# The README's main job: an MLP trained from scratch on Fashion-MNIST by 8 LoRA heads on 3 workers.
CLUSTER_JOB := --model mlp --dataset fashion-mnist --heads 8 --rank 32 --alpha 256 --lr 3e-3 \
	--merge-every 10 --steps 1000 --batch-size 32 --local-workers 3 --port 0
cluster: install data
	$(BIN)/lte-server $(CLUSTER_JOB) --dashboard-port 8080 $(ARGS)

# docs/dashboard.png: the final state of the very job `make cluster` runs (docs/screenshot.py)
screenshot: install data browser
	$(BIN)/python docs/screenshot.py docs/dashboard.png -- $(BIN)/lte-server $(CLUSTER_JOB) --out runs/screenshot

# LTE_NO_SKIPS=1: a test skipped for a missing dependency fails the run (tests/conftest.py)

# The language-model cluster: gpt-micro on the King James Bible (Debian's bible-kjv, no download),
# byte-level tokens, 8 LoRA heads of rank 64 on 2 local workers, int8 base weights.
KJV_DIR := data/kjv

$(KJV_DIR)/train.bin: | $(VENV)/.installed
	@command -v bible >/dev/null || { command -v apt-get >/dev/null || { echo "install Debian's bible-kjv (the 'bible' command)"; exit 1; }; $(APT) update -qq && $(APT) install -y -qq bible-kjv; }
	mkdir -p $(KJV_DIR)
	bible -f "Genesis 1:1-Revelation 22:21" > $(KJV_DIR)/kjv.txt
	$(BIN)/lte-prepare-text $(KJV_DIR)/kjv.txt --out $(KJV_DIR)

data-kjv: $(KJV_DIR)/train.bin

lm-cluster: install data-kjv
	$(BIN)/lte-server --model gpt-micro --dataset text --data-dir $(KJV_DIR) --heads 8 --rank 64 --alpha 1024 \
		--lr 3e-4 --merge-every 8 --steps 400 --batch-size 4 --quant int8 --local-workers 2 --eval-every 10 \
		--port 0 --dashboard-port 8080 $(ARGS)

test: install data browser
	$(BIN)/python proto/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	LTE_NO_SKIPS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The unit tier: no test that starts a process or a server, none marked slow (markers in
# pyproject.toml; tests/conftest.py fails an unmarked test that starts a process or a server).
FAST_TESTS := -m "not process and not server and not slow"
test-fast: install data
	LTE_NO_SKIPS=1 $(BIN)/python -m pytest -q $(FAST_TESTS) $(PYTEST_ARGS)

# mypy over lte.common, lte.commands, lte.server and lte.worker (config in pyproject.toml); `make test` runs it too.
typecheck: install
	$(BIN)/mypy

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

proto-check: install
	$(BIN)/python proto/generate.py --check

clean:
	rm -rf $(VENV) build runs artifacts .pytest_cache
