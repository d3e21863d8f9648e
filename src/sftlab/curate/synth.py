"""`sftlab data synth`: grow a seed set of tasks with Self-Instruct (Wang et al. 2023; Alpaca's variant).

Each round samples in-context tasks from the pool (mostly human-written seeds, some generated), asks a
generator to continue the list as plain text completion (as the paper did with GPT-3, and as any
OpenAI-compatible `/v1/completions` endpoint serves), parses the new instruction/input/output triples,
rejects those too similar to the pool (ROUGE-L), too short or long, or naming banned keywords, and adds
the survivors to the pool. Runs are reproducible by seed and resumable from their progress file.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from sftlab.errors import DataError, SftlabError
from sftlab.files import atomic_write_text

# Alpaca's list: tasks a text-only model cannot do or check (images, files, audio, drawings).
BANNED = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
          "plot", "go to", "video", "audio", "music", "flowchart", "diagram")  # fmt: skip
NO_INPUT = "<noinput>"
HEADER = ("Here are examples of tasks, each with an instruction, an input (or <noinput>) and the correct output. "
          "Write new tasks that differ from these in topic and kind, in the same format.\n\n")  # fmt: skip


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str
    output: str

    def record(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


@dataclass
class SynthSettings:
    num: int
    seed: int = 0
    batch: int = 8  # prompts per round
    prompt_tasks: int = 3  # in-context examples per prompt
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    similarity: float = 0.7  # reject at ROUGE-L F1 >= this against any pool instruction
    min_words: int = 3
    max_words: int = 150
    banned: tuple[str, ...] = BANNED
    patience: int = 20  # rounds in a row without a new task before giving up

    def fingerprint(self) -> dict:
        """What must match for a resumed run to continue the same sequence (num may grow)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "num"}


@dataclass
class Completion:
    text: str
    stopped: bool  # False: cut off at max_new_tokens, so the last task in it may be incomplete


class Generator(Protocol):
    name: str

    def complete(self, prompts: list[str], seed: int, s: SynthSettings) -> list[Completion]: ...


# ---------------------------------------------------------------- seed tasks, prompts, parsing


def load_seed_tasks(path: str) -> list[Task]:
    """Alpaca records {instruction, input, output} or Self-Instruct's {instruction, instances: [{input, output}]}."""
    from sftlab.data.formats import read_jsonl_objects

    if not Path(path).is_file():
        raise DataError(f"--seed-tasks {path}: no such file")
    tasks = []
    for where, r in read_jsonl_objects(Path(path)):
        if isinstance(r.get("instances"), list) and r["instances"]:
            r = {"instruction": r.get("instruction"), **r["instances"][0]}
        if not all(isinstance(r.get(k), str) for k in ("instruction", "output")):
            raise DataError(f"{where}: a seed task needs string fields \"instruction\" and \"output\" "
                            "(and optionally \"input\"), or Self-Instruct's \"instances\" list")  # fmt: skip
        if not r["instruction"].strip() or not r["output"].strip():
            raise DataError(f"{where}: empty instruction or output; fill it in or remove the line")
        tasks.append(Task(r["instruction"].strip(), str(r.get("input") or "").strip(), r["output"].strip()))
    if not tasks:
        raise DataError(f"--seed-tasks {path}: no tasks in the file")
    return tasks


def render_prompt(examples: list[Task]) -> str:
    body = "".join(
        f"Task {i}\nInstruction: {t.instruction}\nInput: {t.input or NO_INPUT}\nOutput: {t.output}\n\n"
        for i, t in enumerate(examples, 1)
    )
    return f"{HEADER}{body}Task {len(examples) + 1}\nInstruction:"


_TASK_MARK = re.compile(r"^\s*(?:#+\s*)?\**\s*Task\s+\d+\s*\**:?\s*$", re.MULTILINE | re.IGNORECASE)
_FIELD = re.compile(r"^\s*\**\s*(Instruction|Input|Output)\s*\**\s*:\s*\**", re.MULTILINE | re.IGNORECASE)


@dataclass
class Candidate:
    task: Task | None
    reason: str | None  # why it was rejected; None while it may still be accepted
    text: str  # the block it was read from


def parse_completion(completion: Completion) -> list[Candidate]:
    """The tasks in a completion (which continues after "Instruction:"); the last block of a cut-off
    completion is rejected as cut off, since its output may be incomplete."""
    blocks = [b for b in _TASK_MARK.split("Instruction: " + completion.text) if b.strip()]
    parsed = []
    for i, block in enumerate(blocks):
        if i == len(blocks) - 1 and not completion.stopped:
            parsed.append(Candidate(None, "cut off at max_new_tokens", block))
            continue
        parts = _FIELD.split(block)  # ['', name, value, name, value, ...]
        fields: dict[str, str] = {}
        for name, value in zip(parts[1::2], parts[2::2]):
            fields.setdefault(name.lower(), value.strip().strip("*").strip())
        if "instruction" not in fields or "output" not in fields:
            parsed.append(Candidate(None, "unparseable", block))
            continue
        given = fields.get("input", "")
        given = "" if given.lower().strip("<>. ") in ("noinput", "no input", "none", "n/a", "") else given
        parsed.append(Candidate(Task(fields["instruction"], given, fields["output"]), None, block))
    return parsed or [Candidate(None, "unparseable", completion.text)]


# ---------------------------------------------------------------- filters


class SimilarityIndex:
    """ROUGE-L F1 of a new instruction against every pool instruction (rouge-score's LCS).

    An upper bound from shared token counts skips most pairs before the quadratic LCS."""

    def __init__(self):
        from sftlab.metrics.text import MixedTokenizer

        self._tokenize = MixedTokenizer().tokenize
        self._pool: list[tuple[list[str], Counter]] = []

    def add(self, text: str) -> None:
        toks = self._tokenize(text)
        self._pool.append((toks, Counter(toks)))

    def reaches(self, text: str, threshold: float) -> bool:
        """Whether any pool instruction has ROUGE-L F1 >= threshold with `text`."""
        from rouge_score.rouge_scorer import _score_lcs

        toks = self._tokenize(text)
        counts = Counter(toks)
        for other, other_counts in self._pool:
            shared = sum((counts & other_counts).values())  # LCS <= shared tokens, so F1 <= 2*shared/(m+n)
            if toks and other and 2 * shared / (len(toks) + len(other)) >= threshold:
                if _score_lcs(other, toks).fmeasure >= threshold:
                    return True
        return False


def reject_reason(task: Task, s: SynthSettings, index: SimilarityIndex, banned_re: re.Pattern | None) -> str | None:
    from sftlab.curate.quality import tokens

    words = len(tokens(task.instruction))
    if words < s.min_words:
        return f"instruction under {s.min_words} words"
    if words > s.max_words:
        return f"instruction over {s.max_words} words"
    if not task.output:
        return "empty output"
    if not task.instruction[0].isalnum():
        return "instruction starts with punctuation"
    if banned_re is not None and banned_re.search(task.instruction):
        return "banned keyword"
    if index.reaches(task.instruction, s.similarity):
        return f"ROUGE-L >= {s.similarity} to the pool"
    return None


def _banned_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


# ---------------------------------------------------------------- the loop


@dataclass
class Progress:
    """OUTPUT's sibling .progress.json: written after every round, so a stopped run resumes there."""

    settings: dict
    rounds: int = 0
    accepted: int = 0  # lines of OUTPUT
    reasons: Counter = field(default_factory=Counter)  # rejections per reason: their sum is .rejected.jsonl's lines

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())


def paths(output: str) -> tuple[Path, Path, Path]:
    out = Path(output)
    return out, out.with_suffix(".rejected.jsonl"), out.with_suffix(".progress.json")


def run_synth(seed_tasks: str, output: str, s: SynthSettings, generator: Generator, say=print) -> int:
    """Grow OUTPUT (Alpaca JSONL) to s.num tasks; 0 when reached, 1 when the generator stopped producing."""
    from tqdm.auto import tqdm

    from sftlab.files import file_digest

    seeds = load_seed_tasks(seed_tasks)
    out, rejected_path, progress_path = paths(output)
    settings = {**s.fingerprint(), "seed_tasks_sha256": file_digest(Path(seed_tasks)), "generator": generator.name}
    progress, machine = _resume(out, rejected_path, progress_path, settings, say)
    index = SimilarityIndex()
    for task in seeds + machine:
        index.add(task.instruction)
    banned_re, stale = _banned_pattern(s.banned), 0
    started = time.perf_counter()
    bar = tqdm(total=s.num, initial=min(progress.accepted, s.num), desc="synth", unit="task")
    while progress.accepted < s.num:
        rng = random.Random(f"{s.seed}:{progress.rounds}")  # a round depends only on seed, round and pool
        prompts = [render_prompt(_sample(rng, seeds, machine, s.prompt_tasks)) for _ in range(s.batch)]
        completions = generator.complete(prompts, rng.randrange(2**31), s)
        kept, dropped = [], []
        for candidate in (c for comp in completions for c in parse_completion(comp)):
            if candidate.reason is None:
                candidate.reason = reject_reason(candidate.task, s, index, banned_re)
            if candidate.reason is not None:
                dropped.append({"reason": candidate.reason, "round": progress.rounds, "text": candidate.text})
                progress.reasons[candidate.reason] += 1
            elif progress.accepted + len(kept) < s.num:  # surplus of the last round is left out
                kept.append(candidate.task)
                machine.append(candidate.task)
                index.add(candidate.task.instruction)
        _append(out, [t.record() for t in kept])
        _append(rejected_path, dropped)
        progress.rounds += 1
        progress.accepted += len(kept)
        _write_progress(progress_path, progress)
        bar.update(len(kept))
        bar.set_postfix(rejected=progress.rejected, round=progress.rounds)
        stale = 0 if kept else stale + 1
        if stale >= s.patience:
            break
    bar.close()
    _summary(say, progress, time.perf_counter() - started, out, rejected_path, progress_path)
    if progress.accepted < s.num:
        say(f"stopped: {s.patience} rounds in a row produced no new task ({progress.accepted} of {s.num}); "
            "see the rejection reasons above. A stronger generator (--endpoint), a higher --temperature or "
            "a larger --max-new-tokens may help; rerun the same command to go on.")  # fmt: skip
        return 1
    return 0


def _sample(rng: random.Random, seeds: list[Task], machine: list[Task], k: int) -> list[Task]:
    """Mostly human-written examples, a third generated once there are some (Self-Instruct: 6 of 8 human)."""
    n_machine = min(len(machine), k // 3)
    picked = rng.sample(seeds, min(k - n_machine, len(seeds))) + rng.sample(machine, n_machine)
    rng.shuffle(picked)
    return picked


def _resume(out: Path, rejected_path: Path, progress_path: Path, settings: dict, say) -> tuple[Progress, list[Task]]:
    if not progress_path.is_file():
        for p in (out, rejected_path):
            if p.exists() and p.stat().st_size:
                raise SftlabError(f"{p} exists but {progress_path.name} does not, so it is not a synth run's "
                                  "output; choose another --output or delete it")  # fmt: skip
        return Progress(settings), []
    saved = json.loads(progress_path.read_text())
    progress = Progress(**{**saved, "reasons": Counter(saved["reasons"])})
    changed = [k for k in settings.keys() | progress.settings.keys() if settings.get(k) != progress.settings.get(k)]
    if changed:
        detail = "; ".join(f"{k}: was {progress.settings.get(k)!r}, now {settings.get(k)!r}" for k in sorted(changed))
        raise SftlabError(f"{out} was started with other settings ({detail}); rerun with the same settings to "
                          "go on, or choose a new --output")  # fmt: skip
    records = _truncate(out, progress.accepted)  # lines past the last finished round: redone
    _truncate(rejected_path, progress.rejected)
    say(f"resuming {out}: {progress.accepted} tasks from {progress.rounds} rounds")
    return progress, [Task(r["instruction"], r["input"], r["output"]) for r in records]


def _truncate(path: Path, lines: int) -> list[dict]:
    kept = path.read_text(encoding="utf-8").splitlines()[:lines] if path.exists() else []
    if len(kept) < lines:
        raise SftlabError(f"{path} has {len(kept)} lines but its progress file counts {lines}; it was edited or "
                          "truncated: choose a new --output")  # fmt: skip
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return [json.loads(line) for line in kept]


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_progress(path: Path, progress: Progress) -> None:
    atomic_write_text(path, json.dumps(vars(progress), indent=1))  # a kill leaves the old or the new progress


def _summary(say, progress: Progress, seconds: float, *files: Path) -> None:
    say(f"{progress.accepted} tasks kept of {progress.accepted + progress.rejected} candidates in {progress.rounds} rounds "
        f"({seconds:.0f} s this run)")  # fmt: skip
    for reason, count in progress.reasons.most_common():
        say(f"  rejected: {reason:34} {count}")
    say("wrote " + ", ".join(str(f) for f in files))
