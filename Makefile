# Two commands do all set-up on a fresh machine (see README.md):
#   make cluster   # a real local cluster: lte-server + 3 lte-worker processes, dashboard URL printed
#   make test      # the whole test suite
# Both create .venv and install what they need first. PYTHON may point at any Python >= 3.10.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: cluster lm-cluster test install data data-kjv lint proto-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CPU) || $(BIN)/pip install -q "torch>=2.2" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(FASHION_MNIST):
	@command -v apt-get >/dev/null || { echo "install Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist (Debian: dataset-fashion-mnist)"; exit 1; }
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FASHION_MNIST)

# The README's main job: an MLP trained from scratch on Fashion-MNIST by 8 LoRA heads on 3 workers.
cluster: install data
	$(BIN)/lte-server --model mlp --dataset fashion-mnist --heads 8 --rank 32 --alpha 256 --lr 3e-3 \
		--merge-every 10 --steps 1000 --batch-size 32 --local-workers 3 --port 0 --dashboard-port 8080 $(ARGS)

# The language-model cluster: gpt-micro on the King James Bible (Debian's bible-kjv, no download),
# byte-level tokens, 8 LoRA heads of rank 64 on 2 local workers, int8 base weights.
KJV_DIR := data/kjv

$(KJV_DIR)/train.bin: | $(VENV)/.installed
	@command -v bible >/dev/null || { command -v apt-get >/dev/null || { echo "install Debian's bible-kjv (the 'bible' command)"; exit 1; }; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bible-kjv; }
	mkdir -p $(KJV_DIR)
	bible -f "Genesis 1:1-Revelation 22:21" > $(KJV_DIR)/kjv.txt
	$(BIN)/lte-prepare-text $(KJV_DIR)/kjv.txt --out $(KJV_DIR)

data-kjv: $(KJV_DIR)/train.bin

lm-cluster: install data-kjv
	$(BIN)/lte-server --model gpt-micro --dataset text --data-dir $(KJV_DIR) --heads 8 --rank 64 --alpha 1024 \
		--lr 3e-4 --merge-every 8 --steps 400 --batch-size 4 --quant int8 --local-workers 2 --eval-every 10 \
		--port 0 --dashboard-port 8080 $(ARGS)

test: install data
	$(BIN)/python proto/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

proto-check: install
	$(BIN)/python proto/generate.py --check

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
