# AutoGLM developer entry points (DESIGN.md §8). `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The virtualenv (torch with its CUDA libraries: ~7 GB) is built once per set of pinned
# dependencies in ~/.cache/autoglm/venv/<hash>; each checkout links .venv to it and
# installs itself in editable mode on top.
DEPS_HASH := $(shell sed -n '/^dependencies/,/^\[project.scripts\]/p' pyproject.toml | sha1sum | cut -c1-12)
VENV_HOME ?= $(HOME)/.cache/autoglm/venv
VENV_CACHED := $(VENV_HOME)/$(DEPS_HASH)
STAMP := .venv.$(DEPS_HASH).$(shell pwd | sha1sum | cut -c1-8).stamp
PYTEST_ARGS ?=

.PHONY: help venv k8s-assets prometheus images lint test test-unit run demo bench crd dashboard \
	alerts check-prometheus-operator

help:
	@echo "make run    - set up, then 'autoglm up examples/tiny.yaml' (the local runtime)"
	@echo "make test   - set up, then lint and every test (what CI runs)"
	@echo "make demo   - a scripted tour"
	@echo "make bench  - every benchmark, printing its figures"
	@echo "make crd    - regenerate crds/ from the typed spec"
	@echo "make dashboard - regenerate the Grafana dashboard ConfigMap in manifests/grafana/"
	@echo "make alerts - regenerate the SLO alerts' PrometheusRule in manifests/monitoring/"
	@echo "make check-prometheus-operator - the PodMonitor under the real Prometheus Operator"

# The shared virtualenv holds one editable install: point it at this checkout if another
# checkout took it over since.
venv: $(STAMP)
	@$(BIN)/python -c "import autoglm, sys; sys.exit(not autoglm.__file__.startswith('$(CURDIR)/'))" \
	  2>/dev/null || $(BIN)/pip install -q --no-deps -e .
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	@if [ ! -f $(VENV_CACHED)/.complete ]; then \
	  echo "building the virtualenv $(VENV_CACHED) (first time: several minutes)"; \
	  rm -rf $(VENV_CACHED) && $(PYTHON) -m venv $(VENV_CACHED) && \
	  $(VENV_CACHED)/bin/pip install -q --upgrade pip && \
	  $(VENV_CACHED)/bin/pip install -q -e '.[dev]' && touch $(VENV_CACHED)/.complete; \
	fi
	@if [ -d $(VENV) ] && [ ! -L $(VENV) ]; then rm -rf $(VENV); fi
	ln -sfn $(VENV_CACHED) $(VENV)
	$(BIN)/pip install -q --no-deps -e .
	@rm -f .venv.*.stamp && touch $@

# Pinned etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok,
# built once into ~/.cache/autoglm (see README).
k8s-assets:
	@bash .ci/k8s-assets.sh >/dev/null

# The operator image and the Triton images (CPU and GPU variants) as OCI archives for
# `ctr images import`, built without a Docker engine and cached by content in
# ~/.cache/autoglm/images (.ci/images.py; needs root); prints the archives' paths.
images:
	@$(PYTHON) .ci/images.py build

lint: venv
	$(BIN)/ruff check operator tests bench e2e examples
	$(BIN)/mypy

test-unit: venv
	$(BIN)/pytest -m "not k8s and not triton and not prometheus and not e2e" $(PYTEST_ARGS)

# The control plane, the real node's pieces and the images the node tests run are built
# (or found in ~/.cache/autoglm) in the background while the virtualenv is set up and the
# code linted: on a fresh machine Go compiles while pip and the image builds download.
# pytest prints its slowest tests, so a run's log says where its time went.
test:
	@d=$$(mktemp -d) && trap 'kill $$(jobs -p) 2>/dev/null; rm -rf $$d' EXIT && \
	  { bash .ci/k8s-assets.sh >$$d/k8s 2>$$d/k8s.log & k8s=$$!; \
	    bash .ci/node-assets.sh >$$d/node 2>$$d/node.log & node=$$!; \
	    $(PYTHON) .ci/images.py build operator triton-cpu >$$d/images 2>$$d/images.log & \
	    images=$$!; } && \
	  $(MAKE) --no-print-directory lint prometheus && \
	  for job in k8s node images; do \
	    wait $${!job} || { echo "building $$job failed:"; tail -n 40 $$d/$$job.log; exit 1; }; \
	    cat $$d/$$job.log; \
	  done && \
	  export AUTOGLM_K8S_ASSETS=$$(cat $$d/k8s) AUTOGLM_NODE_ASSETS=$$(cat $$d/node) && \
	  if [ "$${AUTOGLM_SKIP_NODE_TESTS:-}" = 1 ] && [ "$${CI:-}" != true ]; then \
	    echo "AUTOGLM_SKIP_NODE_TESTS=1: the node and image tests will be skipped"; fi && \
	  $(BIN)/pytest --durations=30 $(PYTEST_ARGS)

# AutoGLM's PodMonitor under the real Prometheus Operator and a Prometheus with Kubernetes
# discovery: what they scrape must equal the node tests' equivalent configuration.
check-prometheus-operator: venv
	$(BIN)/python e2e/check_prometheus_operator.py

crd: venv
	$(BIN)/autoglm crd > crds/autoglmdeployments.autoglm.io.yaml

dashboard: venv
	$(BIN)/python -m autoglm.dashboard > manifests/grafana/autoglm-dashboard.yaml

alerts: venv
	$(BIN)/python -m autoglm.alerts > manifests/monitoring/autoglm-rules.yaml

# Debian's Prometheus, unpacked into ~/.cache/autoglm (no service is installed).
prometheus:
	@bash .ci/prometheus.sh >/dev/null

run: venv prometheus
	$(BIN)/autoglm up examples/tiny.yaml

demo: venv prometheus
	$(BIN)/python examples/demo.py

bench: venv k8s-assets
	AUTOGLM_K8S_ASSETS=$$(bash .ci/k8s-assets.sh) $(BIN)/python bench/operator/bench_operator.py
	$(BIN)/python bench/dataplane/bench_dataplane.py
	$(BIN)/python bench/gateway/bench_gateway.py
	$(BIN)/python bench/autoscaler/bench_autoscaler.py --png bench/autoscaler/replicas.png
	$(BIN)/python bench/placement/bench_placement.py
	$(BIN)/python bench/placement/bench_live.py
