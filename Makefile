# nn2 — the README's commands.
#   make install            create .venv and install nn2 with its dependencies
#   make test               the fast test suite
#   make test-slow          the slow tests too
#   make bench              side-by-side benchmarks (ratios, not tests)
#   make demo               train a small model on a bundled corpus and print a sample
#   make fuzz               a long fuzzing run of the .nnb loader
#
# PyTorch: TORCH_SPEC picks the build. The default is the CPU build; a user with a
# CUDA GPU installs the matching wheel, e.g.
#   make install TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
BIN         := $(VENV)/bin
FUZZ_INPUTS ?= 100000

.PHONY: install test test-slow bench demo fuzz lint clean build-dir

demo fuzz: | build-dir
build-dir:
	@mkdir -p build

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[dev]"
	@$(BIN)/nn2c --version && $(BIN)/nn2run --version

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

bench:
	$(BIN)/python bench/run.py

demo:
	$(BIN)/nn2c train --steps 300 --hidden 128 -o build/demo.nnb
	$(BIN)/nn2run build/demo.nnb --prime "The " -n 300 --seed 1

fuzz:
	$(BIN)/nn2c train --kernel lstm --hidden 8 --layers 2 --seq-len 8 --batch 4 --steps 2 \
	    --eval-every 1 -o build/fuzz-seed.nnb 2>/dev/null
	$(BIN)/python tests/fuzz_loader.py --inputs $(FUZZ_INPUTS) --model build/fuzz-seed.nnb --loader model
	$(BIN)/python tests/fuzz_loader.py --inputs $(FUZZ_INPUTS) --loader format

lint:
	$(BIN)/python -m compileall -q nn2c nn2run tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
