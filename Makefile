# Two entry points (see README): `make app` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; GPU users: `make app TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8501

.PHONY: app test install install-dev system-deps lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[export]"

install-dev: install
	$(PY) -m pip install -q -e ".[export,dev,track]"

# Debian's chromium drives kaleido's PNG/SVG export and the real-browser test.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -q && apt-get install -y -q chromium chromium-driver) >/dev/null || \
	  echo "warning: could not install chromium (needs root): PNG/SVG export and the browser test will skip"; }

# `make app LN=SPEC LNFREE=SPEC [VANILLA=SPEC]` opens on that pair (LNFREE alone: an lnfree.remove directory and
# its base; VANILLA: its vanilla control, shown in the left column).
app: install
	$(VENV)/bin/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) \
	  $(if $(LN)$(LNFREE)$(VANILLA),-- $(if $(LN),--ln "$(LN)") $(if $(LNFREE),--lnfree "$(LNFREE)") \
	  $(if $(VANILLA),--vanilla "$(VANILLA)"))

test: install-dev system-deps
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install-dev
	$(PY) -m bench.bench_removal
	$(PY) -m bench.bench_atp
	$(PY) -m bench.bench_app

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
