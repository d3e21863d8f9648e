"""Does an export answer like the tuned model? Greedy answers and next-token agreement on sample prompts.

The tuned model (fp32, adapter applied as in training) gives each prompt's greedy answer; a
candidate (the export, read back by an independent reader) is scored on the same token ids:
its own greedy answer, and teacher-forced along the tuned answer, how often its next token is the
tuned one (positions where the tuned model's top two are within TIE_NATS are ties, left out) and
how far its log-probability of the tuned token is from the tuned model's. Readers: `TorchLM` (any transformers model,
e.g. transformers' GGUF loader) and `LlamaCppLM` (llama.cpp itself, through llama-cpp-python).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from sftlab.export.merge import CHECK_PROMPTS as MERGE_PROMPTS
from sftlab.export.merge import ExportError
from sftlab.generate import inference_mode

TIE_NATS = 0.1  # below this log-prob gap between its top two tokens the tuned model itself has no preference

# merge's three prompts, then three with longer answers
CHECK_PROMPTS = [
    *MERGE_PROMPTS,
    [{"role": "user", "content": "Give three tips for learning a new language."}],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@dataclass
class Comparison:
    reader: str
    prompts: int
    same_answers: int
    agreement: float  # next-token argmax agreement along the tuned answers, ties left out
    max_logprob_diff: float  # |log p_export - log p_tuned| of the tuned answer's tokens
    mean_logprob_diff: float
    ties: int  # positions where the tuned model's top two tokens are within TIE_NATS: any reader may flip them
    differing: list[dict] = field(default_factory=list)  # {prompt, tuned, export} where answers differ

    def describe(self) -> str:
        return (f"{self.reader}: same greedy answer on {self.same_answers}/{self.prompts} prompts, next-token "
                f"agreement {self.agreement:.2%} ({self.ties} ties left out), log-prob error max {self.max_logprob_diff:.3g} "
                f"mean {self.mean_logprob_diff:.3g}")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


class TorchLM:
    def __init__(self, model, stop: list[int]):
        self.model, self.stop = model.eval(), set(stop)

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new: int) -> list[int]:
        with inference_mode(self.model):
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, eos_token_id=sorted(self.stop), pad_token_id=min(self.stop))  # fmt: skip
        return _until_stop(out[0, len(ids) :].tolist(), self.stop)


class LlamaCppLM:
    """llama.cpp's own inference on the GGUF file: its kernels, its dequantization, its EOG handling."""

    def __init__(self, path, stop: list[int], n_ctx: int = 1024, lora=None):
        from llama_cpp import Llama

        extra = {"lora_path": str(lora)} if lora is not None else {}
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, **extra)
        self.stop = set(stop)

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        scores = torch.from_numpy(self.llm.scores[: len(ids)].copy())
        return scores.float().log_softmax(-1)

    def close(self) -> None:
        self.llm.close()  # now, not in a finalizer at interpreter exit (llama.cpp is unloaded by then)

    def greedy(self, ids: list[int], max_new: int) -> list[int]:
        self.llm.reset()
        out = []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in self.stop or self.llm.token_eos() == token or len(out) >= max_new:
                break
            out.append(token)
        return out


def reference(tuned: TorchLM, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], torch.Tensor]]:
    """Each prompt's tuned greedy answer and the tuned log-probabilities along it."""
    out = []
    for ids in prompts:
        answer = tuned.greedy(ids, max_new)
        out.append((answer, _along(tuned, ids, answer)))
    return out


def compare(name: str, candidate, prompts, ref, max_new: int, tokenizer) -> Comparison:
    same, agree, total, ties, diffs, differing = 0, 0, 0, 0, [], []
    for ids, (answer, tuned_lp) in zip(prompts, ref, strict=True):
        lp = _along(candidate, ids, answer)
        target = tuned_lp.argmax(-1)  # the tuned answer's tokens, then its stop
        top2 = tuned_lp.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) >= TIE_NATS
        agree += int(((lp.argmax(-1) == target) & decisive).sum())
        total += int(decisive.sum())
        ties += int((~decisive).sum())
        diffs.append((lp.gather(-1, target[:, None]) - tuned_lp.gather(-1, target[:, None])).abs()[:, 0])
        got = candidate.greedy(ids, max_new)
        if got == answer:
            same += 1
        else:
            differing.append({"prompt": tokenizer.decode(ids), "tuned": tokenizer.decode(answer),
                              "export": tokenizer.decode(got)})  # fmt: skip
    d = torch.cat(diffs)
    return Comparison(name, len(prompts), same, agree / max(total, 1), float(d.max()), float(d.mean()), ties,
                      differing)  # fmt: skip


def _along(lm, ids: list[int], answer: list[int]) -> torch.Tensor:
    """Log-probabilities at the positions that predict each answer token (and the stop after it)."""
    full = lm.logprobs(ids + answer)
    return full[len(ids) - 1 : len(ids) + len(answer)]


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


def required_same(quant: str, prompts: int) -> tuple[int, float]:
    """What an export of type `quant` must reach: (same greedy answers, next-token agreement).

    16/32-bit floats round weights only: every answer the same. q8_0: 99% of next tokens and all but
    one answer in six. bitsandbytes' int8 (LLM.int8) rounds the activations to 8 bits per row as well:
    95%, as q5/q6. 4-bit and smaller types: 90% of next tokens (answers reported, not required),
    the tolerance their ~0.5 bit-per-weight error allows on a small model."""
    if quant in ("f32", "f16"):
        return prompts, 0.99
    if quant in ("bf16", "q8_0"):
        return math.ceil(prompts * 5 / 6), 0.99
    if quant in ("q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "int8"):
        return 0, 0.95
    return 0, 0.90


def against_tuned(loaded, readers, quant: str, prompts, max_new: int, say=print) -> list[Comparison]:
    """Each reader's answers against the tuned model's (`loaded`, in fp32); ExportError for the first
    below what `quant` must reach. `readers`: (name, factory of a model or an object with greedy/logprobs)."""
    from sftlab.data.templates import stop_ids
    from sftlab.generate import prompt_ids

    tokenizer = loaded.tokenizer
    stop = stop_ids(tokenizer, tokenizer.chat_template)
    ids = [prompt_ids(tokenizer, c) for c in prompts or CHECK_PROMPTS]
    from sftlab.model.load import is_4bit

    tuned = loaded.model if is_4bit(loaded.model) else loaded.model.float()  # a qlora run: its 4-bit base, as trained
    ref = reference(TorchLM(tuned, stop), ids, max_new)
    need_same, need_agree = required_same(quant, len(ids))
    results = []
    for name, make in readers:
        candidate = make(stop)
        candidate = candidate if hasattr(candidate, "greedy") else TorchLM(candidate, stop)
        got = compare(name, candidate, ids, ref, max_new, tokenizer)
        if hasattr(candidate, "close"):
            candidate.close()
        say(got.describe())
        results.append(got)
        if got.same_answers < need_same or got.agreement < need_agree:
            raise ExportError(f"the {quant} export does not answer like the tuned model ({got.describe()}; it must "
                              f"give {need_same} same answers and {need_agree:.0%} agreement); export removed")  # fmt: skip
    return results
