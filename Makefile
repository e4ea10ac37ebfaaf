# Phoenix developer commands. Everything runs inside a local virtualenv (.venv).
#   make quickstart   install, then the CPU quickstart (data -> tokenizer -> train -> resume)
#   make test         install, then the whole test suite (what CI runs)
#   make test-fast    skip the slow multi-process / end-to-end tests

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.phoenix-installed
export OMP_NUM_THREADS ?= 1

# torch is pinned to the CPU build available on the development machines; GPU users
# install phoenix into an environment that already has their CUDA torch (see README).
CPU_TORCH = torch==2.13.0
DEPS = megatron-core==0.16.1 psutil numpy sentencepiece tokenizers safetensors tensorboard pybind11 pyyaml tqdm einops
TEST_DEPS = pytest hypothesis matplotlib transformers wandb

.PHONY: install quickstart test test-fast clean

$(STAMP): setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(CPU_TORCH)
	$(BIN)/python -m pip install -q $(DEPS) $(TEST_DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	bash examples/quickstart.sh $(BIN)/python

test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow"

clean:
	rm -rf build *.egg-info phoenix/data/_plan_cpp*.so runs
