# Tessera — two commands on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8501

.PHONY: setup demo run dev test bench browser clean-demo gpu-bundle

$(STAMP): requirements.txt core/viewer/vendor.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m core.viewer.vendor
	touch $(STAMP)

setup: $(STAMP)
	@$(PY) -m core.viewer.vendor >/dev/null

# Builds the demo cohort (world, model, predictions) once; later runs are cache hits.
demo: setup
	$(PY) -m core.cli demo

# The file watcher is off (it would watch .venv too and flood the log); `make dev` turns it on.
run: demo
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) \
	  --server.headless true --browser.gatherUsageStats false --server.fileWatcherType none

dev: demo
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) \
	  --server.headless true --browser.gatherUsageStats false --server.fileWatcherType poll --server.runOnSave true

# Debian's chromium for the browser tests; installed when missing and we are root (CI is).
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium not found and not root: browser tests will be skipped"; fi; \
	fi

test: setup browser
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.tiler
	$(PY) -m benchmarks.store_bench --reuse
	$(PY) -m benchmarks.layout_bench
	$(PY) -m benchmarks.survival_bench
	$(PY) -m benchmarks.load_bench
	$(PY) -m benchmarks.viewer_bench
	$(PY) -m benchmarks.foundation_bench
	$(PY) -m benchmarks.cells_bench

# What a GPU machine without a package registry lacks (wheels for Python 3.12, fp16 encoder
# weights; git-ignored, <= 40 MiB); prints the one device command (README: "On a GPU server").
gpu-bundle: setup
	$(PY) -m benchmarks.gpu_bundle --out gpu-bundle

clean-demo:
	rm -rf data/demo
