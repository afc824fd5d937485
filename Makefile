# prism-tf: two commands from a fresh clone — `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-all demo lint bench bench-quick bench-export bench-compress bench-speed bench-serve clean

install: $(STAMP)

# Re-runs only when the pins change: a second `make install` is a no-op.
$(STAMP): requirements.txt overrides.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip --version >/dev/null
	@test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --python $(PY) -r requirements.txt --override overrides.txt
	$(VENV)/bin/uv pip install --python $(PY) --no-deps -e .
	@cd / && $(abspath $(PY)) -c "import prism_tf, tff_pipelines, export, tensorflow_federated, tensorflow as tf; print('prism-tf installed; stack ready: tf', tf.__version__, 'tff', tensorflow_federated.__version__)"
	@touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The slow tests too (long CLI runs, notebooks with more rounds).
test-all: install
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# A first look (about 4.5 minutes on 2 idle cores): PriSM beside `small` (equal client flops) and FedAvg, each accuracy
# re-checked by Keras evaluate of the saved model; runs and runs/demo/demo.png in runs/demo/ (bench/demo.py).
demo: install
	$(PY) bench/demo.py

# Accuracy at equal client cost (bench/accuracy.py): resumable, results in bench/results/<profile>/.
bench-quick: install
	$(PY) bench/accuracy.py --profile quick

bench: install
	$(PY) bench/accuracy.py --profile full

# Exported TFLite training models: bytes and LiteRT train-step time, sub-model vs full (bench/export_sizes.py).
bench-export: install
	$(PY) bench/export_sizes.py

# Rank truncation, post-training and quantization-aware int8 of two trained runs against file size, multiply-adds,
# LiteRT latency and accuracy (bench/compress.py; resumable): results in bench/results/compress/. Needs the seed-0
# runs of `bench/accuracy.py --profile levers` (PriSM and FedAvg).
bench-compress: install
	$(PY) bench/compress.py --prism bench/runs/levers/iid/prism_prism/seed0 --fedavg bench/runs/levers/iid/fedavg/seed0

# Speed and memory against their floors, every figure a ratio measured in the same run (bench/speed.py, <= 20 min;
# `--profile quick` about 3 minutes on an idle machine): results in bench/results/speed/.
bench-speed: install
	$(PY) bench/speed.py --profile full

# The round server under load: uploads/s, p50/p99 latency at 10/50/200 devices, memory, round open/close
# (bench/serve.py): results in bench/results/serve/.
bench-serve: install
	$(PY) bench/serve.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache runs
