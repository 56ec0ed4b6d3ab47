# Fresh-machine entry points: each target sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test test-unit test-e2e demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[cpu,test]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
	# imports beside the CPU torch (see docs/installation.md).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, vllm_ascend_pd; print('vllm', vllm.__version__)"
	touch $(STAMP)

install: $(STAMP)

# The whole suite: unit tests, then real vLLM end to end on the CPU.
test: $(STAMP)
	$(PY) -m pytest -q -rs tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-e2e: $(STAMP)
	$(PY) -m pytest -q -rs tests/e2e

# Builds the tiny model, starts 1P1D + proxy on the CPU, sends a completion
# and a chat completion, prints the answers and the transfer statistics.
demo: $(STAMP)
	$(PY) -m vllm_ascend_pd.demo

clean:
	rm -rf $(VENV) .pytest_cache demo-work
