"""lm-evaluation-harness tasks on the model sftlab loaded: `sftlab eval --harness TASK[,TASK...]`.

lm-eval runs in process on the model object itself (a PeftModel with its adapter applied, a bottleneck or
a full model), through its own HFLM wrapper, so its numbers are of exactly the weights sftlab evaluates,
computed under the caller's autocast (the run's precision path, speed.as_trained.computing).

Metrics keep lm-eval's own scale (acc 0..1, as lm-eval and the leaderboards print them) and come keyed
"harness/<task>/<metric>" ("/<filter>" appended for a filter other than lm-eval's "none"). Each comes
with per-item evidence (evaluate.significance) built from lm-eval's logged samples in doc_id order, so
a base and a tuned model pair item by item; the evidence is kept only where it reproduces the metric.

lm-eval is optional: it is imported here, inside functions, only when --harness asks for it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import numbers
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from sftlab.errors import ConfigError, DataError
from sftlab.evaluate.significance import PerItem, mean_scores

LM_EVAL = "lm-eval==0.4.13"  # the version this module is written and tested against
PREFIX = "harness"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # datasets' readers of local files


@dataclass
class HarnessSpec:
    tasks: list[str] = field(default_factory=list)  # lm-eval task, group or tag names (or YAML paths)
    num_fewshot: int | None = None  # None: each task's own default (0 where it names none)
    limit: int | None = None  # the first N documents of every task
    include_path: str | None = None  # a folder of lm-eval YAML tasks, added to the built-in ones
    apply_chat_template: bool = False  # render prompts with the tokenizer's chat template
    seed: int = 0  # every seed lm-eval takes: python, numpy, torch and the few-shot sampler


class HarnessResult(NamedTuple):
    metrics: dict[str, float]  # {"harness/<task>/<metric>": value}
    evidence: dict[str, PerItem]  # per-item scores of the metrics that have them
    info: dict  # what metrics.json should keep: lm-eval version, settings, each task's config


def harness_scores(model, tokenizer, spec: HarnessSpec, batch_size: int = 8, chat_template: str | None = None
                   ) -> HarnessResult:  # fmt: skip
    """Run the spec's lm-eval tasks on `model`; call it inside the caller's `computing` context.

    chat_template: a template text to render with instead of the tokenizer's own (with apply_chat_template)."""
    lm_eval = _lm_eval()
    manager = check_harness(spec)
    lm = wrap(model, tokenizer, batch_size, spec.apply_chat_template, chat_template)
    with _quiet(), _dataset_errors():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit, task_manager=manager,
            log_samples=True, apply_chat_template=spec.apply_chat_template, bootstrap_iters=0,
            random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
            fewshot_random_seed=spec.seed,
        )  # fmt: skip
    metrics = flat_metrics(out["results"])
    return HarnessResult(metrics, evidence_of(out, metrics), describe(out, spec, lm_eval.__version__))


def check_harness(spec: HarnessSpec):
    """Fail early, before any model loads: lm-eval installed, the settings sane, every task known.
    Returns the TaskManager that knows them."""
    _lm_eval()
    if not spec.tasks:
        raise ConfigError("--harness: name at least one lm-eval task (e.g. --harness hellaswag,arc_easy)")
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {spec.num_fewshot}: must be 0 or more")
    if spec.limit is not None and spec.limit < 1:
        raise ConfigError(f"--limit {spec.limit}: must be 1 or more (documents per task)")
    if spec.include_path and not Path(spec.include_path).is_dir():
        raise ConfigError(f"--include-path {spec.include_path}: not a folder (of lm-eval YAML task files)")
    manager = task_manager(str(Path(spec.include_path).resolve()) if spec.include_path else None)
    known = set(manager.all_tasks)
    for name in spec.tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"harness task '{name}' is not one lm-eval knows{hint}; `lm-eval ls tasks` lists them, "
                          "and --include-path DIR adds your own YAML tasks")  # fmt: skip
    return manager


@lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's index of its ~15,000 tasks (and the include path's): seconds to build, so built once."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=include_path)


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # HFLM: what fails when one of its dependencies is missing
    except ImportError as e:
        cause = "" if e.name == "lm_eval" else f" (importing it failed: {e})"
        raise ConfigError(f"--harness needs lm-evaluation-harness{cause}: pip install '{LM_EVAL}'") from e
    return lm_eval


def wrap(model, tokenizer, batch_size: int = 8, apply_chat_template: bool = False, chat_template: str | None = None):
    """lm-eval's HFLM around the model object as loaded (HFLM takes an instance, a PeftModel included).

    HFLM wraps every forward in its own torch.autocast, enabled only with a dtype: without one it would
    switch the caller's autocast off, so it is handed the caller's. Log-softmax runs in fp32 (as sftlab's
    own choice scoring does): a bf16 softmax would round the log-likelihoods lm-eval compares."""
    import torch
    from lm_eval.models.huggingface import HFLM

    if apply_chat_template and not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise ConfigError("--apply-chat-template: the model's tokenizer has no chat template (a base model); "
                          "leave the flag off, or evaluate a run trained with one")  # fmt: skip
    device = next(model.parameters()).device.type
    cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with _quiet():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32,
                    mixed_precision_dtype=cast,
                    chat_template_args={"chat_template": chat_template} if chat_template else None)  # fmt: skip


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": "N/A", ...}} as {"harness/task/acc": v}."""
    out = {}
    for task, row in results.items():
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if filt and not metric.endswith("_stderr") and isinstance(value, numbers.Real):
                out[metric_key(task, metric, filt)] = float(value)
    return out


def metric_key(task: str, metric: str, filt: str) -> str:
    return f"{PREFIX}/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")


def evidence_of(out: dict, metrics: dict[str, float]) -> dict[str, PerItem]:
    """Per-item evidence of each metric: the items' scores in doc_id order (a group's: its tasks' items,
    task by task), kept where their mean is the metric, or where lm-eval's own aggregation of the items
    (a corpus metric: perplexity, F1, BLEU) is."""
    per_task = {task: _sample_values(samples) for task, samples in out.get("samples", {}).items()}
    groups = out.get("group_subtasks", {})
    evidence = {}
    for task, row in out["results"].items():
        for key in row:
            metric, _, filt = key.partition(",")
            name = metric_key(task, metric, filt)
            if name not in metrics:
                continue
            values = [v for t in _leaves(task, groups) for v in per_task.get(t, {}).get((metric, filt), [])]
            found = _evidence(values, metrics[name], _aggregation(out, task, metric))
            if found is not None:
                evidence[name] = found
    return evidence


def _sample_values(samples: list[dict]) -> dict[tuple[str, str], list]:
    """{(metric, filter): each document's value, in doc_id order} of one task's logged samples."""
    values: dict[tuple[str, str], list] = {}
    for s in sorted(samples, key=lambda s: (s["filter"], s["doc_id"])):
        for metric in s.get("metrics", []):
            values.setdefault((metric, s["filter"]), []).append(s[metric])
    return values


def _leaves(task: str, groups: dict[str, list[str]]) -> list[str]:
    """A task itself, or a group's tasks depth first in sorted order (the same order for both models)."""
    if task not in groups:
        return [task]
    return [leaf for child in sorted(groups[task]) for leaf in _leaves(child, groups)]


def _aggregation(out: dict, task: str, metric: str):
    """lm-eval's aggregation of a task's metric: its YAML's metric_list entry, else the metric's default."""
    from lm_eval.api.registry import get_aggregation, get_metric_aggregation

    for entry in out.get("configs", {}).get(task, {}).get("metric_list") or []:
        if entry.get("metric") == metric and "aggregation" in entry:
            agg = entry["aggregation"]
            return agg if callable(agg) else get_aggregation(agg)
    with _quiet():
        return get_metric_aggregation(metric)


def _evidence(values: list, metric: float, aggregation) -> PerItem | None:
    if not values:
        return None
    if all(isinstance(v, numbers.Real) for v in values) and _same(sum(values) / len(values), metric):
        return mean_scores(values, binary=all(v in (0, 1) for v in values))
    if aggregation is not None:
        try:
            if _same(float(aggregation(values)), metric):
                return PerItem(items=values, corpus=lambda items: float(aggregation(items)))
        except Exception:  # noqa: BLE001  (an aggregation that needs more than the items: no evidence)
            return None
    return None


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 + 1e-6 * abs(b)


def describe(out: dict, spec: HarnessSpec, version: str) -> dict:
    """What reproduces the numbers, for metrics.json: lm-eval's version, the settings, and per task its
    dataset, output type, shots, documents scored and a hash of its whole resolved config (prompts included)."""
    tasks = {}
    for task, cfg in out.get("configs", {}).items():
        text = json.dumps(cfg, sort_keys=True, default=str)
        tasks[task] = {"dataset": cfg.get("dataset_path"), "dataset_name": cfg.get("dataset_name"),
                       "dataset_kwargs": cfg.get("dataset_kwargs"),
                       "split": cfg.get("test_split") or cfg.get("validation_split"),
                       "output_type": cfg.get("output_type"), "num_fewshot": out.get("n-shot", {}).get(task),
                       "items": out.get("n-samples", {}).get(task, {}).get("effective"),
                       "version": out.get("versions", {}).get(task),
                       "source": (cfg.get("metadata") or {}).get("config_source"),
                       "config_sha256": hashlib.sha256(text.encode()).hexdigest()}  # fmt: skip
    higher = out.get("higher_is_better", {})
    lower = sorted(metric_key(task, metric, filt) for task, row in out["results"].items()
                   for metric, _, filt in (key.partition(",") for key in row)
                   if filt and higher.get(task, {}).get(metric) is False)  # fmt: skip
    return {"lm_eval": version, "tasks": list(spec.tasks), "num_fewshot": spec.num_fewshot, "limit": spec.limit,
            "include_path": spec.include_path, "apply_chat_template": spec.apply_chat_template, "seed": spec.seed,
            "groups": out.get("group_subtasks", {}), "task_configs": tasks, "lower_is_better": lower}  # fmt: skip


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every step at INFO and WARNING (an instance passed as `pretrained`, seeds set, ...):
    only its errors reach sftlab's output."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _dataset_errors():
    """A task whose dataset cannot be loaded, or that runs model-written code, as one line naming it."""
    try:
        yield
    except OSError as e:  # datasets and huggingface_hub raise OSErrors: ConnectionError, FileNotFoundError, ...
        task = _failing_task(e)
        if task is None:
            raise
        raise DataError(_dataset_message(task, e)) from e
    except ValueError as e:
        if "marked as unsafe" not in str(e):
            raise
        raise ConfigError(f"harness: {str(e).split('.')[0]}: sftlab does not run lm-eval's code-executing tasks; "
                          "use an eval.tasks entry of type code (sandboxed)") from e  # fmt: skip


def _failing_task(exc: BaseException):
    """The lm-eval Task whose dataset download raised `exc`, or None (raised elsewhere: not a dataset's)."""
    from lm_eval.api.task import Task

    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if frame.f_code.co_name == "download" and isinstance(obj, Task):
            return obj
    return None


def _dataset_message(task, exc: OSError) -> str:
    import datasets

    name, path, config = task.config.task, task.DATASET_PATH, task.DATASET_NAME
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    local = path in LOCAL_BUILDERS or Path(str(path)).exists()  # files of the user's: no cache to fetch into
    if not local and (offline or isinstance(exc, ConnectionError)):
        where = "(offline)" if offline else "and the Hugging Face Hub cannot be reached"
        args = ", ".join(repr(a) for a in (path, config) if a)
        return (f"harness task {name}: its dataset {path} is not in the local Hugging Face cache {where}; fetch it "
                f"once with `python -c \"import datasets; datasets.load_dataset({args})\"` on a machine with network, "
                "or point --include-path at a local YAML task")  # fmt: skip
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"harness task {name}: its dataset {path} could not be loaded: {first}"
