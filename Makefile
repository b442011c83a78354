# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is pinned here (not in pyproject) so a fresh machine takes the CPU build
# that lies on disk instead of downloading a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
# optional groups to install too: `make install EXTRAS=dev,openvino` adds OpenVINO (export --format openvino;
# its tests skip without it)
EXTRAS  ?= dev
DEMO    := demo-out

.PHONY: install demo test lint readme-check bench bench-fast bench-int8 bench-baseline nncodec-env clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# real architectures for the tests, in pure PyTorch; its torchvision dependency serves one model only
	$(BIN)/pip install -q --no-deps "pytorchcv==0.0.74"
	touch $(STAMP)

demo: install
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/compress zoo train lenet5 --train-data mnist5k --epochs 3 -o $(DEMO)/lenet5.pt
	$(BIN)/compress report $(DEMO)/lenet5.pt --data mnist5k
	$(BIN)/compress pipeline $(DEMO)/lenet5.pt --train-data mnist5k --max-accuracy-drop 1.0 \
		--recipe docs/recipes/demo.toml -o $(DEMO)/lenet5.cpz --report $(DEMO)/report
	$(BIN)/compress report $(DEMO)/lenet5.cpz --data mnist5k

# two test processes (pytest-xdist; an idle one takes tests from the other, so one long file is no long tail)
TEST_WORKERS ?= 2

test: install lint
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist worksteal -p no:cacheprovider --durations=25 tests

# ruff (the rules in pyproject.toml, and its formatting) on everything, mypy on the library, and the layers
# (tools/check_layers.py: every import counted, zero cycles, no import from a lower layer to a higher one)
lint: install
	$(BIN)/ruff check compress tests bench tools
	$(BIN)/ruff format --check compress tests bench tools
	$(BIN)/mypy
	$(BIN)/python tools/check_layers.py

# every command of the README's command-line tour, as written, in a fresh folder (~10 minutes)
readme-check: install
	$(BIN)/python tools/readme_check.py

# all benchmarks (the slow ones train ResNets and run whole pipelines: several minutes), then the tests
# marked slow (real architectures end to end), which `make test` leaves out
bench: install
	$(BIN)/python -m pytest -q bench -p no:cacheprovider --benchmark-json=bench-results.json
	$(BIN)/python bench/render_results.py bench-results.json docs/results.md
	$(BIN)/python -m pytest -q -m slow tests -p no:cacheprovider

bench-fast: install
	$(BIN)/python -m pytest -q bench -m "not slow" -p no:cacheprovider --benchmark-json=bench-results.json

# INT8 alone (five models, each runtime in its own process; ~40 minutes on 2 cores), its sections of docs/results.md
# updated in place; COMPRESS_BENCH_ROUNDS=5 and BENCH_INT8_K=resnet20 (a -k expression) for a quick look
BENCH_INT8_K ?= test_int8_in_pytorch
bench-int8: install
	$(BIN)/python -m pytest -q bench/test_bench_int8.py -k "$(BENCH_INT8_K)" -p no:cacheprovider \
		--benchmark-json=bench-int8.json
	$(BIN)/python bench/render_results.py bench-int8.json docs/results.md --update

# the baseline that .github/workflows/bench.yml compares with (held-out evaluation, as in CI)
bench-baseline: install
	rm -rf bench/baselines && COMPRESS_BENCH_EVAL=heldout $(BIN)/python -m pytest -q bench -m "not slow" \
		-p no:cacheprovider --benchmark-storage=file://bench/baselines --benchmark-save=baseline \
		--benchmark-json=bench/baselines/quality.json

# NNCodec (MPEG NNR), the peer of the NNCodec rows of `make bench`, in its own environment outside the repo;
# then `NNCODEC_PYTHON=$(NNCODEC_ENV)/bin/python make bench`
NNCODEC_ENV ?= /work/nncodec-env
nncodec-env:
	sh tools/nncodec_env.sh $(NNCODEC_ENV)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .benchmarks bench-results.json
