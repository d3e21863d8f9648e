"""Answer conversations with a model and the chat template it was trained with (greedy or sampled)."""

from __future__ import annotations

import contextlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sftlab.errors import ConfigError, DataError


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


def answer(loaded, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
           top_p: float = 1.0, seed: int | None = None) -> str:  # fmt: skip
    """One reply to `messages`, rendered with the model's saved chat template (docs/correctness.md rule 2)."""
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    return generate_answers(loaded.model, loaded.tokenizer, [messages], sampling)[0]


def answer_prompts(models: dict[str, object], conversations: list[list[dict]], sampling: Sampling,
                   output: str | None = None, say: Callable[..., None] = print,
                   expected: list[str | None] | None = None) -> list[dict]:  # fmt: skip
    """`sftlab generate`: every conversation answered by every model, each answer printed as it comes.

    `models` maps a result field to a loaded model (sftlab.rundir.Loaded, loaded by the caller: rundir is
    this module's layer): "response", and "base_response" for the base side by side. `expected`: per
    conversation the text a right answer contains (or None); each answer is then marked right or wrong
    and the counts printed. Returns one {messages, response[, base_response][, expected, <field>_right]}
    row per conversation, also written as JSONL to `output`."""
    labels = {"response": "tuned" if "base_response" in models else "answer", "base_response": "base"}
    expected = expected or [None] * len(conversations)
    results = []
    for messages, wanted in zip(conversations, expected):
        result = {"messages": messages} | ({"expected": wanted} if wanted is not None else {})
        say(f"### {messages[-1]['content']}")
        for key, loaded in models.items():
            result[key] = generate_answers(loaded.model, loaded.tokenizer, [messages], sampling)[0]
            mark = ""
            if wanted is not None:
                result[f"{key}_right"] = is_right(result[key], wanted)
                mark = "  (right)" if result[f"{key}_right"] else f"  (wrong; expected {wanted!r})"
            say(f"[{labels[key]}] {result[key]}{mark}")
        say()
        results.append(result)
    if any(w is not None for w in expected):
        scored = sum(w is not None for w in expected)
        say("right: " + ", ".join(f"{labels[k]} {sum(r.get(f'{k}_right', False) for r in results)}/{scored}"
                                  for k in models))  # fmt: skip
    if output:
        Path(output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    return results


def is_right(answer: str, expected: str) -> bool:
    """Whether an answer holds the expected text (case and width folded)."""
    fold = lambda t: unicodedata.normalize("NFKC", t).casefold()  # noqa: E731
    return fold(expected) in fold(answer)


def generate_answers(model, tokenizer, conversations: list[list[dict]], sampling: Sampling, batch_size: int = 8,
                     chat_template: str | None = None, desc: str | None = None, synced: bool = False) -> list[str]:  # fmt: skip
    """Replies to many conversations, rendered with the chat template and stopped at end-of-turn.

    `chat_template` overrides the tokenizer's (the training loop passes the template it trains with).
    `synced`: every rank generates the same, in step (a sharded model's forwards are collective).
    """
    prompts = [prompt_ids(tokenizer, m, chat_template) for m in conversations]
    return [text for text, _ in complete_ids(model, tokenizer, prompts, sampling, batch_size, desc, synced=synced)]


def continue_texts(model, tokenizer, texts: list[str], sampling: Sampling, stop: list[str], batch_size: int = 8,
                   desc: str | None = None) -> list[str]:  # fmt: skip
    """Each raw text continued (no chat template; the tokenizer's own special tokens, as in pretraining) and
    cut before the first of `stop`: the completion protocol of base-model benchmarks such as HumanEval."""
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    outs = complete_ids(model, tokenizer, prompts, sampling, batch_size, desc, stop_strings=stop, strip=False)
    return [cut_at(text, stop) for text, _ in outs]


def cut_at(text: str, stop: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop sequence."""
    return text[: min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))]


@torch.no_grad()
def complete_ids(model, tokenizer, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8,
                 desc: str | None = None, stop_strings: list[str] | None = None, strip: bool = True,
                 synced: bool = False) -> list[tuple[str, bool]]:  # fmt: skip
    """(text, stopped) continuing each prompt: longest prompts batched together, left-padded.

    stopped is False where the text ran into max_new_tokens instead of an end-of-turn token. `stop_strings`
    also end a sequence (the text keeps them; callers cut); strip=False keeps leading whitespace (code)."""
    from tqdm.auto import tqdm

    from sftlab.data.templates import end_of_turn_ids

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
                                 pad_token_id=tokenizer.pad_token_id, **sampling.generate_kwargs(),
                                 **_stopping(tokenizer, stop_strings, width), **({"synced_gpus": True} if synced else {}))  # fmt: skip
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                stopped = any(t in stop for t in new)
                text = tokenizer.decode(new, skip_special_tokens=True)
                results[i] = (text.strip() if strip else text, stopped)
    return results


def _stopping(tokenizer, stop: list[str] | None, start: int) -> dict:
    """generate()'s stopping_criteria for stop sequences in the *generated* text only. transformers' own
    stop_strings also match across the prompt's end (a prompt ending in a newline, then "def", is "\ndef"),
    where the completion protocol, as HumanEval's harness, looks only at what was generated."""
    if not stop:
        return {}
    from transformers import StoppingCriteria, StoppingCriteriaList

    class InNewText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return {"stopping_criteria": StoppingCriteriaList([InNewText()])}


def prompt_ids(tokenizer, messages: list[dict], chat_template: str | None = None, tools: list[dict] | None = None
               ) -> list[int]:  # fmt: skip
    """The generation prompt's token ids: the conversation rendered with the (given or saved) template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        chat_template=chat_template, tools=tools)  # fmt: skip
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


def gather_conversations(prompts: list[str], prompts_file: str | None,
                         system: str | None) -> tuple[list[list[dict]], list[str | None]]:  # fmt: skip
    """`sftlab generate`'s conversations and their expected answers: each --prompt as a user turn, then those
    of --prompts, each opened by the --system message when there is one."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    expected: list[str | None] = [None] * len(prompts)
    if prompts_file:
        from_file, wanted = read_prompts(prompts_file)
        conversations, expected = conversations + from_file, expected + wanted
    if not conversations:
        raise ConfigError("give at least one --prompt TEXT or --prompts FILE.jsonl")
    if system:
        conversations = [[{"role": "system", "content": system}] + c for c in conversations]
    return conversations, expected


def read_prompts(path: str) -> tuple[list[list[dict]], list[str | None]]:
    """A JSONL file of {"prompt": str} or {"messages": [...]} per line -> (message lists, each line's optional
    "expected": text a right answer contains)."""
    conversations, expected = [], []
    for where, record in _prompt_records(path):
        if isinstance(record.get("prompt"), str):
            conversations.append([{"role": "user", "content": record["prompt"]}])
        elif isinstance(record.get("messages"), list):
            msgs = record["messages"]
            # A trailing assistant message is the reference answer: the model writes its own.
            conversations.append(msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs)
        else:
            raise DataError(f"{where}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
        value = record.get("expected")
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{where}: \"expected\" must be non-empty text, got {value!r}")
        expected.append(value)
    return conversations, expected


def _prompt_records(path: str):
    from sftlab.data.formats import read_jsonl_objects

    if not Path(path).is_file():
        raise DataError(f"{path}: no such prompts file")
    records = list(read_jsonl_objects(Path(path)))
    if not records:
        raise DataError(f"{path}: no prompts")
    return records
