# Common tasks. `make install` once, then the others.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install lint format test test-fast test-slow train train-ensemble sweep report tensorboard clean

install:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -e ".[dev]"

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test:
	$(VENV)/bin/pytest -m "not slow"

# the unit tier: no training run, under a minute (integration too: make test)
test-fast:
	$(VENV)/bin/pytest -m unit

# the real ../shared data and weights: long, run by hand and reported
test-slow:
	$(VENV)/bin/pytest -m slow

train:
	$(PY) -m vision_tl.train $(ARGS)

train-ensemble:
	$(PY) -m vision_tl.train model=ensemble trainer.devices=1 $(ARGS)

# a batch size x LR grid; the summary lands in the sweep dir (make report DIR=... rewrites it)
sweep:
	$(PY) -m vision_tl.train -m data.batch_size=4,8 optimizer.lr=0.01,0.001 $(ARGS)

report:
	$(PY) -m vision_tl.report $(DIR)

tensorboard:
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf outputs .pytest_cache .ruff_cache
