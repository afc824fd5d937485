# prism-tf: two commands from a fresh clone — `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-all demo lint bench bench-quick clean

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

demo: install
	$(PY) -m tff_pipelines train --method prism --model resnet18 --width 8 --dataset cifar10 \
	  --clients 10 --clients-per-round 5 --examples-per-client 500 --rounds 10 --local-epochs 2 --client-lr 0.1 \
	  --batch-size 20 --keep-ratio 0.2 --eval-every 2 --eval-examples 2000 --seed 0 --out runs/demo --overwrite

# Accuracy at equal client cost (bench/accuracy.py): resumable, results in bench/results/<profile>/.
bench-quick: install
	$(PY) bench/accuracy.py --profile quick

bench: install
	$(PY) bench/accuracy.py --profile full

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache runs
