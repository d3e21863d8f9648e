"""Load what a run produced (adapter, full model, or any model.name) and answer with its chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sftlab.config import ModelConfig, load_config
from sftlab.errors import DataError, ModelError


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    base_name: str  # model.name of the base, for --base comparisons
    is_adapter: bool


def load_for_inference(source: str) -> Loaded:
    """A run directory (LoRA or full), an exported model directory, or anything model.name accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.models import load_model, load_tokenizer

    path = Path(source)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = _base_of(path)
        model = PeftModel.from_pretrained(load_model(ModelConfig(name=base_name)), str(path))
        return Loaded(model.eval(), AutoTokenizer.from_pretrained(path), base_name, True)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        base = _base_of(path) if (path / "config.yaml").is_file() else str(path)
        return Loaded(model.eval(), AutoTokenizer.from_pretrained(path), base, False)
    if path.is_dir():
        raise ModelError(f"{source}: neither a run directory (no adapter_config.json or config.json) nor a model")
    cfg = ModelConfig(name=source)
    return Loaded(load_model(cfg).eval(), load_tokenizer(cfg), source, False)


def _base_of(run_dir: Path) -> str:
    if (run_dir / "config.yaml").is_file():  # a run of ours: its config names the base as the user did
        return load_config(run_dir / "config.yaml").model.name
    return json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


@torch.no_grad()
def answer(loaded: Loaded, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
           top_p: float = 1.0, seed: int | None = None) -> str:  # fmt: skip
    """One reply to `messages`, rendered with the model's saved chat template (GUIDE rule 2)."""
    from sftlab.models import end_of_turn_ids

    tok = loaded.tokenizer
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = loaded.model.generate(
        **inputs, max_new_tokens=max_new_tokens, eos_token_id=sorted(end_of_turn_ids(tok)),
        pad_token_id=tok.pad_token_id, **sampling,
    )  # fmt: skip
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def read_prompts(path: str) -> list[list[dict]]:
    """A JSONL file of {"prompt": str} or {"messages": [...]} per line -> message lists."""
    conversations = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            conversations.append([{"role": "user", "content": record["prompt"]}])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            msgs = record["messages"]
            # A trailing assistant message is the reference answer: the model writes its own.
            conversations.append(msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs)
        else:
            raise DataError(f"{path}:{lineno}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
    if not conversations:
        raise DataError(f"{path}: no prompts")
    return conversations
