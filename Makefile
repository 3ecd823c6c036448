# The README's commands. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch taken when no NVIDIA GPU is present. Machines whose pip cannot find it
# locally can point PIP_INDEX_URL / PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.focalloop-installed

.PHONY: install demo lint typecheck architecture browser pytest test clean

install: $(STAMP)

# Re-runs only when the project's requirements change, so a second `make install` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: torch comes from the project's range (a CUDA build)"; \
	else \
		$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_CPU)"; \
	fi
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

# The simulated loop on scikit-learn's digits (digit 8 rare): a table, results.json and a plot.
demo: install
	$(VENV)/bin/focalloop demo --out demo-output

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

# Import directions (pyproject's [tool.importlinter]) and dead code.
architecture: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture services workers labeling tests --min-confidence 100

# The browser tests (tests/browser/) drive Debian's Chromium through Debian's chromedriver, so
# selenium never downloads a driver. Installed here when missing and run as root (CI).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver; \
	else \
		echo "the browser tests need: sudo apt-get install chromium chromium-driver"; \
	fi

pytest: install
	$(VENV)/bin/pytest --durations=25

test: lint typecheck architecture browser pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis demo-output bench-output
