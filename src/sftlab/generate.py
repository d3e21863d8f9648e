"""Load what a run produced (adapter, full model, or any model.name) and answer with its chat template."""

from __future__ import annotations

import contextlib
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

    from sftlab.model.load import load_model, load_tokenizer
    from sftlab.model.methods import ADAPTER_CONFIG, load_bottleneck

    path = Path(source)
    if (path / ADAPTER_CONFIG).is_file():  # bottleneck adapters (train.method=adapter)
        base_name = _base_of(path)
        model = load_bottleneck(load_model(ModelConfig(name=base_name)), path)
        return Loaded(model.eval(), AutoTokenizer.from_pretrained(path), base_name, True)
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
    from sftlab.model.methods import ADAPTER_CONFIG

    if (run_dir / ADAPTER_CONFIG).is_file():
        return json.loads((run_dir / ADAPTER_CONFIG).read_text())["base"]
    return json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def answer(loaded: Loaded, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
           top_p: float = 1.0, seed: int | None = None) -> str:  # fmt: skip
    """One reply to `messages`, rendered with the model's saved chat template (GUIDE rule 2)."""
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    return generate_answers(loaded.model, loaded.tokenizer, [messages], sampling)[0]


def generate_answers(model, tokenizer, conversations: list[list[dict]], sampling: Sampling, batch_size: int = 8,
                     chat_template: str | None = None, desc: str | None = None) -> list[str]:  # fmt: skip
    """Replies to many conversations, rendered with the chat template and stopped at end-of-turn.

    `chat_template` overrides the tokenizer's (the training loop passes the template it trains with).
    """
    prompts = [prompt_ids(tokenizer, m, chat_template) for m in conversations]
    return [text for text, _ in complete_ids(model, tokenizer, prompts, sampling, batch_size, desc)]


@torch.no_grad()
def complete_ids(model, tokenizer, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8,
                 desc: str | None = None) -> list[tuple[str, bool]]:  # fmt: skip
    """(text, stopped) continuing each prompt: longest prompts batched together, left-padded.

    stopped is False where the text ran into max_new_tokens instead of an end-of-turn token."""
    from tqdm.auto import tqdm

    from sftlab.model.load import end_of_turn_ids

    stop = sorted(end_of_turn_ids(tokenizer))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    results: list[tuple[str, bool]] = [("", True)] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with inference_mode(model):
        for idx in tqdm(batches, desc=desc, disable=desc is None, unit="batch", leave=False):
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in idx])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=sampling.max_new_tokens, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id, **sampling.generate_kwargs())  # fmt: skip
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                stopped = any(t in stop for t in new)
                results[i] = (tokenizer.decode(new, skip_special_tokens=True).strip(), stopped)
    return results


def prompt_ids(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[int]:
    """The generation prompt's token ids: the conversation rendered with the (given or saved) template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        chat_template=chat_template)  # fmt: skip
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)  # some tokenizers return an encoding


@contextlib.contextmanager
def inference_mode(model):
    """Eval mode, KV cache on and the model's own (mask-aware) attention while generating; restored after.

    Training may run a causal kernel that assumes right padding and whole sequences (sftlab.speed.attention);
    generation has left padding and one query token against a cache, which needs the masked path.
    """
    config = model.config
    was_training, use_cache, impl = model.training, config.use_cache, config._attn_implementation
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    from sftlab.speed import attention

    try:
        model.eval()
        config.use_cache = True
        if impl == attention.NAME:
            base.set_attn_implementation("sdpa")
        yield
    finally:
        if impl == attention.NAME:
            base.set_attn_implementation(impl)
        config.use_cache = use_cache
        model.train(was_training)


def read_prompts(path: str) -> list[list[dict]]:
    """A JSONL file of {"prompt": str} or {"messages": [...]} per line -> message lists."""
    from sftlab.data.formats import read_jsonl_objects

    if not Path(path).is_file():
        raise DataError(f"{path}: no such prompts file")
    conversations = []
    for where, record in read_jsonl_objects(Path(path)):
        if isinstance(record.get("prompt"), str):
            conversations.append([{"role": "user", "content": record["prompt"]}])
        elif isinstance(record.get("messages"), list):
            msgs = record["messages"]
            # A trailing assistant message is the reference answer: the model writes its own.
            conversations.append(msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs)
        else:
            raise DataError(f"{where}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
    if not conversations:
        raise DataError(f"{path}: no prompts")
    return conversations
