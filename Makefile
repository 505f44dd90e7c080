PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint test demo bench bench-streams image-test deploy-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests benchmarks
	$(BIN)/ruff format --check proxy
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

test: lint
	$(BIN)/pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/access-proxy demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-streams: $(STAMP)
	$(BIN)/python benchmarks/streams.py

# Builds the Docker image (and its base image when absent) and runs it end to end; needs root
# and Docker (installed with apt when missing; dockerd started when no daemon answers).
# Not part of `test`.
image-test: $(STAMP)
	deploy/docker/image-test-prereqs.sh
	ACCESS_PROXY_IMAGE_TEST=1 $(BIN)/pytest -v -s -p no:cacheprovider tests/image

# Alert rules and their tests, and the dashboard's PromQL, through promtool (Debian: prometheus).
deploy-check: $(STAMP)
	$(BIN)/python deploy/deploy_check.py

clean:
	rm -rf $(VENV) .state
