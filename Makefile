# Two commands matter: `make demo` and `make test`. Both start with `make setup`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a machine with a GPU use e.g. `make setup TORCH=torch`.
TORCH  ?= torch==2.13.0
MODEL  ?= runs/guppy

.PHONY: setup demo train chat test compat compat-lowest bench web clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[space,export,test]"
	touch $@

$(MODEL)/model.safetensors: | setup
	$(BIN)/guppylm train --output-dir $(MODEL) --resume

train: $(MODEL)/model.safetensors

demo: train
	GUPPYLM_MODEL=$(MODEL) GRADIO_SERVER_NAME=127.0.0.1 $(BIN)/python space/app.py

chat: train
	$(BIN)/guppylm chat --model $(MODEL)

web: train
	$(BIN)/guppylm serve-web --model $(MODEL)

test: setup
	$(BIN)/python -m pytest

# the saved model folder under transformers 4.57.6 ... newest, each in its own cached environment (tests/compat/)
compat: setup
	$(BIN)/python tests/compat/matrix.py

# the fast tests with every dependency at the lower bound pyproject.toml declares (tests/compat/lowest.py)
compat-lowest: setup
	$(BIN)/python tests/compat/lowest.py

clean:
	rm -rf runs artifacts .pytest_cache
