# difficulty-audit: `make demo` opens the dashboard, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8501

.PHONY: demo test test-fast lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.address localhost --browser.gatherUsageStats false

# Debian's Chromium for the browser tests (never `playwright install`); skipped when present or not root.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will be skipped"; }

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rs

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/capture_overhead.py
	$(PY) bench/aum_update.py
	$(PY) bench/detection.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
