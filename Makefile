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

# pip runs quietly (-q): each step says what it installs first, so minutes of silence are
# never a mystery (torch alone is a large download).
$(STAMP): setup.py $(wildcard csrc/*)
	@echo "== [1/5] creating the virtualenv $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "== [2/5] upgrading pip, setuptools, wheel"
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@echo "== [3/5] installing $(CPU_TORCH) (CPU build; a large download, a few minutes)"
	$(BIN)/python -m pip install -q $(CPU_TORCH)
	@echo "== [4/5] installing $(DEPS) $(TEST_DEPS)"
	$(BIN)/python -m pip install -q $(DEPS) $(TEST_DEPS)
	@echo "== [5/5] installing phoenix (editable) and compiling the data-plan extension (csrc/)"
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $(STAMP)
	@echo "== installed: $(VENV)/bin/phoenix ($$($(BIN)/phoenix --version))"

install: $(STAMP)

quickstart: install
	bash examples/quickstart.sh $(BIN)/python

test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=25

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow"

clean:
	rm -rf build *.egg-info phoenix/data/_plan_cpp*.so runs
