import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

# The embedded model is converted once per machine; keep it out of the user's cache during tests.
os.environ.setdefault("SFTLAB_CACHE", str(ROOT / ".cache" / "sftlab"))
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smol_tok():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), from the embedded GGUF."""
    from sftlab.config import ModelConfig
    from sftlab.models import load_tokenizer

    return load_tokenizer(ModelConfig(name="smollm2-135m-instruct"))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh tokenization cache for one test."""
    import sftlab.data.dataset as ds

    monkeypatch.setattr(ds, "_cache_dir", lambda: tmp_path / "tokenized")
    return tmp_path / "tokenized"


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts become JSON; strings are written raw, for malformed lines)."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return path
