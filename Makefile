# Two entry points do all set-up on a fresh machine:
#   make demo   synthetic LIP -> the whole pipeline on configs/demo.yaml
#   make test   the test suite (what CI runs through .ci/run)
# Both create .venv from requirements.lock first (about 30 s with uv).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: env demo test test-slow lint lock clean

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@command -v dot >/dev/null || (echo "installing graphviz (cell diagrams)"; \
	  (apt-get install -y -qq graphviz >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq graphviz >/dev/null 2>&1)) || \
	  echo "WARNING: graphviz 'dot' could not be installed; genotype diagrams will fail")
	@ldconfig -p | grep -q libtcmalloc_minimal || (echo "installing tcmalloc (the default memory allocator)"; \
	  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) || \
	  echo "WARNING: tcmalloc could not be installed; nppnet falls back to TensorFlow's allocator (more memory)")
	touch $(STAMP)

demo: env
	$(BIN)/nppnet run --config configs/demo.yaml

test: env
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: env
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS) || test $$? -eq 5  # 5: none collected

lint: env
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

lock:
	$(BIN)/uv pip compile --python-version 3.11 requirements.in -o requirements.lock

clean:
	rm -rf $(VENV) runs mlruns .pytest_cache
