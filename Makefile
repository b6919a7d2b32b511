# `make demo` and `make test` work on a fresh clone: each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU torch wheel kept on local disk (as on our CI machines) is used when present,
# so that no multi-GB CUDA build is downloaded; elsewhere pip picks the usual torch.
LOCAL_WHEELS ?= /opt/wheels
TORCH_LOCAL ?= torch==2.13.0
PYTEST_ARGS ?=
# tests/test_app.py drives the demo in Debian's Chromium through its chromedriver (never a downloaded browser).
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export PYTHONUNBUFFERED = 1
export GRADIO_ANALYTICS_ENABLED = False

.PHONY: demo app test browser tiny-digits bench conformance clean-venv

$(VENV)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if ls $(LOCAL_WHEELS)/torch-2.13.0* >/dev/null 2>&1; then \
		$(PIP) install -q --find-links $(LOCAL_WHEELS) "$(TORCH_LOCAL)"; \
	fi
	$(PIP) install -q -c constraints.txt -e ".[test,train,eval,digits,demo,quantization]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/generate.py --output_path outputs/demo.png

app: $(VENV)/.installed
	$(PY) app.py

browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

test: $(VENV)/.installed browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Writes outputs/tiny-digits/package; `make tiny-digits INSTALL=1` replaces the shipped default in src/ with it.
tiny-digits: $(VENV)/.installed
	PYTHON=$(abspath $(PY)) INSTALL=$(INSTALL) bash examples/tiny_digits/train_tiny_digits.sh

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

# transformers' and diffusers' own test mixins on rar_hf (conformance/README.md). Needs git snapshots of both
# upstreams (TF_GIT= / DF_GIT=, or .mirror/ folders next to or above the repo) and downloads the transformers sdist
# once into .conformance/sdist. A subset: make conformance CONFORMANCE_ARGS="--suite diffusers -k callback".
CONFORMANCE_ARGS ?=
$(VENV)/.conformance-installed: $(VENV)/.installed setup.cfg constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[conformance]"
	touch $@

conformance: $(VENV)/.conformance-installed
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m conformance $(CONFORMANCE_ARGS)

clean-venv:
	rm -rf $(VENV)
