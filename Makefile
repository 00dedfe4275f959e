# Two commands do all the set-up: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned as a pair: a torchvision beside a mismatched torch fails to import.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: run test venv lint data
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST for the *_fashion presets: Debian's dataset-fashion-mnist (the four IDX files in
# /usr/share/datasets/fashion-mnist); needs root or sudo. Elsewhere: task.download=true.
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		{ $$(test "$$(id -u)" = 0 || echo sudo) apt-get update && \
		  $$(test "$$(id -u)" = 0 || echo sudo) apt-get install -y dataset-fashion-mnist; }

# Extra Hydra overrides: make run ARGS="transfer.alpha=0.25 seed=1"
run: venv
	$(PY) -m ptlab $(ARGS)

# ruff's lint and format check, as CI runs them (the rules are in pyproject.toml; `ruff format .` fixes the format)
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Extra pytest arguments: make test ARGS="-m slow"
test: venv
	$(PY) -m pytest $(ARGS)

# The image built and the tracking stack started for real with podman (root or sudo; 24 min the
# first time under load, installing what it needs; 4 min once the images exist): docker/README.md
.PHONY: test-docker
test-docker:
	docker/test-stack.sh
