# nn2 — the README's commands. On a fresh clone each target installs what it needs
# into .venv first (once: a stamp file remembers, and pyproject.toml changing redoes it).
#   make demo               train a small model on the bundled corpus, then generate from it
#   make test               the fast test suite
#   make test-slow          the slow tests (wheel install, Lambda bundles, long runs)
#   make lint               ruff, configured in pyproject.toml
#   make bench              side-by-side benchmarks (ratios, not tests)
#   make bench-quality      nn2 against torch.nn.LSTM on tinyshakespeare, 10 minutes an arm
#   make fuzz               a long fuzzing run of the .nnb loader
#   make install            everything: runtime, compiler (torch, lark, rich), test tools
#   make lambda MODEL=m.nnb ARCH=x86_64|arm64   an AWS Lambda deployment zip
#   make proto              regenerate the gRPC code in nn2run/proto from nn2.proto
#
# PyTorch: TORCH_SPEC picks the version, TORCH_INDEX the index it comes from (empty: the
# configured one). A CPU-only machine wants the CPU build, a GPU machine the CUDA build
# that matches its driver, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   make install TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
QUALITY_ARGS ?=
BIN         := $(VENV)/bin
FUZZ_INPUTS ?= 100000
ARCH        ?= x86_64
LAMBDA_PYTHON ?= 3.11

# Stamps: the runtime alone (enough for a Lambda bundle); the compiler's extras (enough
# for demo); those and the test tools.
RUN_STAMP   := $(VENV)/.installed-run
TRAIN_STAMP := $(VENV)/.installed-train
DEV_STAMP   := $(VENV)/.installed-dev

# pytest exits 5 when it ran no test: say so and fail, never pass silently.
define pytest
	@$(BIN)/python -m pytest -q $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make $@: pytest selected no tests; failing" >&2; exit 1; fi; exit $$rc
endef

.PHONY: install test test-slow bench bench-quality demo fuzz lint lambda clean build-dir proto

demo fuzz lambda: | build-dir
build-dir:
	@mkdir -p build

# Always reinstalls, so a new TORCH_SPEC or TORCH_INDEX takes effect.
install:
	@rm -f $(RUN_STAMP) $(TRAIN_STAMP) $(DEV_STAMP)
	@$(MAKE) --no-print-directory $(DEV_STAMP)
	@$(BIN)/nn2c --version && $(BIN)/nn2run --version

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(TRAIN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[train]"
	@touch $@

$(DEV_STAMP): $(TRAIN_STAMP)
	$(BIN)/pip install --quiet -e ".[train,dev]"
	@touch $@

test: $(DEV_STAMP)
	$(call pytest,)

test-slow: $(DEV_STAMP)
	$(call pytest,-m slow)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

bench: $(TRAIN_STAMP)
	$(BIN)/python bench/run.py

# Not part of `make bench`: about 21 minutes. QUALITY_ARGS passes options, e.g.
#   make bench-quality QUALITY_ARGS="--minutes 2 --bf16"
bench-quality: $(TRAIN_STAMP)
	$(BIN)/python bench/quality.py $(QUALITY_ARGS)

demo: $(TRAIN_STAMP)
	$(BIN)/nn2c train --steps 300 --hidden 128 -o build/demo.nnb
	$(BIN)/nn2run build/demo.nnb --prime "The " -n 300 --seed 1
	@echo    # the sample ends where the model stopped, mid-line

fuzz: $(TRAIN_STAMP)
	$(BIN)/nn2c train --kernel lstm --hidden 8 --layers 2 --seq-len 8 --batch 4 --steps 2 \
	    --eval-every 1 -o build/fuzz-seed.nnb 2>/dev/null
	$(BIN)/python tests/support/fuzz_loader.py --inputs $(FUZZ_INPUTS) --model build/fuzz-seed.nnb --loader model
	$(BIN)/python tests/support/fuzz_loader.py --inputs $(FUZZ_INPUTS) --loader format

lambda: $(RUN_STAMP)
	@test -n "$(MODEL)" || { echo "make lambda: give the model, e.g. make lambda MODEL=build/demo.nnb ARCH=arm64" >&2; exit 2; }
	$(BIN)/python tools/lambda_bundle.py "$(MODEL)" --arch $(ARCH) --python $(LAMBDA_PYTHON) \
	    -o build/lambda-$(ARCH).zip

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

# The gRPC messages and service classes, generated from nn2run/proto/nn2.proto and kept in
# the repository (the runtime needs no protoc); tests/test_grpc_proto.py checks they match.
proto: $(DEV_STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. nn2run/proto/nn2.proto
