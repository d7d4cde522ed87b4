# Two entry points, both incremental: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0

.PHONY: demo test install install-test clean

# torch is installed first and pinned: any other requirement asked for first
# would pull a CUDA build of several gigabytes.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -qq -e . "$(TORCH_PIN)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -qq -e ".[test,ray]" "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/cdi demo

# The suite runs on every core (pytest-xdist); --dist loadscope keeps each test module on one worker, so
# module fixtures (an audited toy world, a Ray instance) are built once. The duration is printed at the end.
TEST_WORKERS ?= auto
test: install-test
	@start=$$(date +%s); $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests; status=$$?; \
	echo "make test: pytest took $$(( $$(date +%s) - start )) s"; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info
