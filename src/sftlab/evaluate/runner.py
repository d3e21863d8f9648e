"""`sftlab eval`: one model (and optionally its base) through eval loss, generation metrics and tasks.

Both models see the same prompts, rendered with the evaluated run's chat template, and the same
tokenized eval data, so every difference in the table comes from the weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sftlab import rundir
from sftlab.config import Config, TaskSpec, load_config
from sftlab.errors import ConfigError, DataError, ModelError
from sftlab.evaluate.benchmarks import Item
from sftlab.rundir import load_run
from sftlab.speed.as_trained import FP32, computing, weights_dtype
from sftlab.task import get_task
from sftlab.task.base import score_eval

LOWER_IS_BETTER = ("/loss", "/ppl", "perplexity", "/bits_per_byte")  # the last two: lm-eval's rolling tasks


@dataclass
class EvalInputs:
    cfg: Config
    tokenizer: object  # renders every prompt, for both models
    eval_data: object  # tokenized data.eval (or the eval_split hold-out), or None
    references: list[Item]  # data.eval conversations: prompt + reference answer
    tasks: list[tuple[TaskSpec, list[Item]]]
    harness: object = None  # evaluate.harness.HarnessSpec: lm-eval tasks run on each model
    harness_info: dict | None = None  # what lm-eval resolved (version, task configs): set by the first model scored


def resolve_target(target: str, overrides: list[str]) -> tuple[Config, str, Path]:
    """(config, model source, default output dir) for a run directory or a run YAML."""
    path = Path(target)
    if path.is_dir():
        if not rundir.is_run(path):
            raise ConfigError(f"{path}: not a run directory (no {rundir.CONFIG}); pass a run directory or a YAML config")
        if rundir.model_kind(path) is None:
            raise ModelError(f"{path}: the run has no final model yet (interrupted?); finish it with "
                             f"`sftlab train {path / rundir.CONFIG} --resume`")  # fmt: skip
        return rundir.read_config(path, overrides), str(path), path / rundir.EVAL
    if not path.is_file():
        raise ConfigError(f"{target}: no such run directory or config file")
    cfg = load_config(path, overrides)
    run = Path(cfg.train.output_dir)
    return cfg, str(run) if rundir.model_kind(run) else cfg.model.name, run / rundir.EVAL


def prepare_inputs(cfg: Config, tokenizer, harness=None) -> EvalInputs:
    from sftlab.evaluate.benchmarks import load_benchmark

    data = eval_data(cfg, tokenizer)
    references = reference_items(cfg, cfg.eval.max_examples)
    tasks = [(spec, load_benchmark(spec, cfg.eval.limit)) for spec in cfg.eval.tasks]
    if data is None and not references and not tasks and harness is None:
        raise ConfigError("nothing to evaluate: add data.eval (or data.eval_split) or eval.tasks to the config, "
                          "or name lm-eval tasks with --harness")  # fmt: skip
    return EvalInputs(cfg, tokenizer, data, references, tasks, harness)


def eval_data(cfg: Config, tokenizer):
    """The tokenized data.eval, or the run's seeded data.eval_split hold-out; None when it has neither."""
    if not (cfg.data.eval or (cfg.data.train and cfg.data.eval_split > 0)):
        return None
    from sftlab.data.dataset import load_split, load_train_eval

    if cfg.data.eval:
        return load_split(cfg.data, tokenizer, "eval").dataset
    return load_train_eval(cfg.data, tokenizer, cfg.train.seed)[1]


def loss_of(model, cfg: Config, data, tokenizer) -> dict:
    """eval_loss of `model` on tokenized `data` in training's batches (the same padding, the same rounding)."""
    from sftlab.metrics.perplexity import eval_loss
    from sftlab.model.loss import SupervisedLoss

    return eval_loss(SupervisedLoss(model, cfg.train.loss_chunk_tokens), data, cfg.train.batch_size,
                     tokenizer.pad_token_id)  # fmt: skip


def example_losses_of(model, cfg: Config, data, tokenizer) -> list[tuple[float, int]]:
    from sftlab.metrics.perplexity import example_losses
    from sftlab.model.loss import SupervisedLoss

    return example_losses(SupervisedLoss(model, cfg.train.loss_chunk_tokens), data, tokenizer.pad_token_id)


def reference_items(cfg: Config, limit: int = 0) -> list[Item]:
    """data.eval conversations ending in an assistant turn: that turn is the reference answer."""
    from sftlab.data.sources import load_spec

    items = []
    for spec in cfg.data.eval:
        loaded = load_spec(spec, cfg.data.on_bad_record, cfg.data.system_prompt)
        for conv in loaded.conversations:
            if conv.messages and conv.messages[-1].role == "assistant":
                prompt = [{"role": m.role, "content": m.content} for m in conv.messages[:-1]]
                items.append(Item(prompt, conv.messages[-1].content))
    return items[:limit] if limit else items


def score_model(model, inputs: EvalInputs, label: str, scorers=None, compute=FP32) -> tuple[dict, dict, dict]:
    """Flat metrics {"eval/loss": ..., "<task>/accuracy": ...}, answers {(source, index): text} and each
    metric's per-item evidence (evaluate.significance), computed on `compute`'s path (speed.as_trained: the
    run's autocast; its attention for the loss)."""
    with computing(model, compute, kernels=False):
        return _score(model, inputs, label, scorers, compute)


def _score(model, inputs: EvalInputs, label: str, scorers, compute) -> tuple[dict, dict, dict]:
    from sftlab.evaluate import benchmarks as B
    from sftlab.evaluate.significance import loss_evidence, mean_scores
    from sftlab.generate import Sampling, continue_texts, generate_answers
    from sftlab.metrics.text import numeric_match, numeric_matches

    cfg, tok = inputs.cfg.eval, inputs.tokenizer
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    metrics, answers, evidence = {}, {}, {}

    def generate(items, desc, n=1):
        convs = [it.messages for it in items for _ in range(n)]
        out = generate_answers(model, tok, convs, sampling, cfg.batch_size, desc=f"{desc} ({label})")
        return [out[i * n : (i + 1) * n] for i in range(len(items))]

    def complete(items, desc, n=cfg.num_samples):  # the code prompt continued raw, no chat template
        texts = [it.code["prompt"] for it in items for _ in range(n)]
        out = continue_texts(model, tok, texts, sampling, B.COMPLETION_STOP, cfg.batch_size, f"{desc} ({label})")
        return [out[i * n : (i + 1) * n] for i in range(len(items))]

    if inputs.eval_data is not None:
        with computing(model, compute):
            result = loss_of(model, inputs.cfg, inputs.eval_data, tok)
            evidence |= loss_evidence(example_losses_of(model, inputs.cfg, inputs.eval_data, tok))
        metrics |= {"eval/loss": result["eval_loss"], "eval/ppl": result["eval_ppl"]}
        metrics |= {f"eval/{k.split('/', 1)[1]}/loss": v for k, v in result.items() if k.startswith("eval_loss/")}
    if inputs.references:
        replies = [r[0] for r in generate(inputs.references, "eval data")]
        refs = [it.reference for it in inputs.references]
        _text_scores("eval", replies, refs, scorers, metrics, evidence)
        answers |= {("data.eval", i): r for i, r in enumerate(replies)}
    for spec, items in inputs.tasks:
        name = spec.label
        if spec.type == "multiple_choice":
            scores = B.choice_logprobs(model, tok, items, cfg.batch_size)
            metrics |= {f"{name}/{k}": v for k, v in B.multiple_choice_scores(items, scores).items()}
            evidence |= {f"{name}/{k}": mean_scores([100 * h for h in v], binary=True)
                         for k, v in B.multiple_choice_hits(items, scores).items()}  # fmt: skip
            answers |= {(name, i): it.choices[max(range(len(s)), key=s.__getitem__)]
                        for i, (it, s) in enumerate(zip(items, scores))}  # fmt: skip
            continue
        if spec.type == "code":
            for protocol in spec.protocols:
                task = code_label(spec, protocol)
                replies = generate(items, task, cfg.num_samples) if protocol == "chat" else complete(items, task)
                answers |= {(task, i): r[0] for i, r in enumerate(replies)}
                _code_scores(task, items, replies, protocol, cfg, metrics, evidence)
            continue
        replies = generate(items, name)
        answers |= {(name, i): r[0] for i, r in enumerate(replies)}
        first, refs = [r[0] for r in replies], [it.reference for it in items]
        if spec.type == "exact_match":
            metrics[f"{name}/exact_match"] = numeric_match(first, refs)
            evidence[f"{name}/exact_match"] = mean_scores([100 * h for h in numeric_matches(first, refs)], True)
        else:
            _text_scores(name, first, refs, scorers, metrics, evidence)
    if inputs.harness is not None:  # last: lm-eval sets the global random, numpy and torch seeds
        from sftlab.evaluate.harness import harness_scores

        result = harness_scores(model, tok, inputs.harness, cfg.batch_size)
        metrics |= result.metrics
        evidence |= result.evidence
        inputs.harness_info = inputs.harness_info or result.info
    return metrics, answers, evidence


def code_label(spec: TaskSpec, protocol: str) -> str:
    """A code task's label in the table: its name for the chat protocol, NAME/completion for the other."""
    return spec.label if protocol == "chat" else f"{spec.label}/completion"


def _code_scores(label: str, items: list[Item], replies: list[list[str]], protocol: str, cfg, metrics: dict,
                 evidence: dict) -> None:  # fmt: skip
    """pass@k of each k and its per-problem evidence (binary with one sample: McNemar applies)."""
    from sftlab.evaluate import benchmarks as B
    from sftlab.evaluate.significance import mean_scores

    program = B.build_program if protocol == "chat" else B.completion_program
    scores, statuses = B.code_scores(items, replies, cfg.pass_k, cfg.code_timeout, cfg.code_memory_mb,
                                     progress=True, program=program)  # fmt: skip
    metrics |= {f"{label}/{k}": v for k, v in scores.items()}
    for k in cfg.pass_k:
        per = [100 * B.pass_at_k(len(st), st.count("passed"), k) for st in statuses]
        evidence[f"{label}/pass@{k}"] = mean_scores(per, binary=len(replies[0]) == 1)


def _text_scores(prefix: str, replies: list[str], refs: list[str], scorers, metrics: dict, evidence: dict) -> None:
    """The generation metrics and their per-item evidence, computed once (the metric is the evidence whole)."""
    from sftlab.evaluate.significance import text_evidence

    for key, ev in text_evidence(replies, refs, scorers).items():
        metrics[f"{prefix}/{key}"], evidence[f"{prefix}/{key}"] = ev.whole(), ev


def run_eval(target: str, overrides: list[str] = (), output: str | None = None, compare: str | None = None,
             say=print, precision: str = "as-trained", judge: str | None = None, judge_model: str | None = None,
             harness=None) -> dict:  # fmt: skip
    """Evaluate a run (and its base with compare="base", or any model.name); write metrics.json and samples.jsonl.

    precision: "as-trained" computes both models on the run's precision path (summary.json's
    `compute`; fp32 for a run without one), so eval loss reads as training's did; "fp32" in fp32.
    judge: an OpenAI-compatible endpoint that then grades the open-ended answers (evaluate.judge);
    harness: an evaluate.harness.HarnessSpec, lm-eval tasks run in process on each model."""
    cfg, source, default_out = resolve_target(target, overrides)
    out = Path(output) if output else default_out
    if cfg.task != "causal_lm":
        if compare or judge or harness:
            raise ConfigError("--compare, --judge and --harness are for chat (causal_lm) runs; classification and "
                              "seq2seq runs print their own metrics")  # fmt: skip
        return eval_task_run(source, cfg, out, say)
    if judge:  # a wrong URL or key fails now, not after the generation
        from sftlab.evaluate.judge import probe

        judge, judge_model = probe(judge, judge_model)
    if harness is not None:  # unknown tasks and bad settings fail before a model loads
        from sftlab.evaluate.harness import check_harness

        harness = replace(harness, seed=cfg.eval.seed)
        check_harness(harness)
    started = time.perf_counter()
    compute = (rundir.read_compute(Path(source)) if precision == "as-trained" else None) or FP32
    dtype = weights_dtype(compute, adapter=rundir.model_kind(Path(source)) not in (None, "full"))
    loaded = load_run(source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)  # the user's, never the run's
    inputs = prepare_inputs(cfg, loaded.tokenizer, harness)
    if judge and not (inputs.references or any(s.type == "generation" for s, _ in inputs.tasks)):
        raise ConfigError("--judge grades open-ended answers: data.eval conversations or generation tasks; this "
                          "eval has neither (code and multiple-choice tasks are scored by their tests)")  # fmt: skip
    scorers = _scorers(cfg, say) if inputs.references or any(s.type == "generation" for s, _ in inputs.tasks) else None
    say(f"evaluating {source} ({_describe(compute)})")
    sandbox = _sandbox(inputs, say)
    results = {"model": score_model(loaded.model, inputs, "model", scorers, compute)}
    base_source = None
    if compare:
        base_source = loaded.base_name if compare == "base" else compare
        if base_source == source:
            raise ConfigError(f"--compare {compare}: {source} is not a fine-tune of another model; name the base")
        del loaded
        say(f"evaluating the base {base_source}")
        base = load_run(base_source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        results["base"] = score_model(base.model, inputs, "base", scorers, compute)
    record = _record(cfg, source, base_source, results, time.perf_counter() - started)
    record["compute"] = compute.record()
    if scorers is not None:
        record |= scorers.record()  # which encoder and layer BERTScore used, which WordNet METEOR read
    if inputs.harness_info:
        record["harness"] = inputs.harness_info
    if sandbox:
        record["sandbox"] = sandbox
    write_results(out, record, _samples(inputs, results))
    say(format_table(record))
    if judge:  # after the write: a judge failure never loses the eval
        record["judge"] = _judge(out, inputs, source, judge, judge_model, cfg.eval.seed, say)
        write_results(out, record, None)
    say(f"wrote {out / 'metrics.json'} and {out / 'samples.jsonl'}")
    return record


def _judge(out: Path, inputs: EvalInputs, source: str, endpoint: str, model: str, seed: int, say) -> dict:
    """The judge's grades and base-vs-tuned verdicts on the open-ended answers: data.eval and generation tasks."""
    from sftlab.evaluate.judge import format_judge, judge_samples, ratings_stores, read_samples

    sources = {"data.eval"} | {spec.label for spec, _ in inputs.tasks if spec.type == "generation"}
    stores = ratings_stores(Path(source) if Path(source).is_dir() else out.parent)
    judged = judge_samples(read_samples(out / "samples.jsonl"), endpoint, model, cache=out / "judge_cache.jsonl",
                           ratings=stores, seed=seed, say=say, sources=sources)  # fmt: skip
    say(format_judge(judged))
    return judged


def _sandbox(inputs: EvalInputs, say) -> str | None:
    """The code sandbox's isolation, named once where code tasks run (metrics.json keeps it)."""
    if not any(spec.type == "code" for spec, _ in inputs.tasks):
        return None
    from sftlab.evaluate.sandbox import isolation

    say(f"code sandbox: {isolation().description}")
    return isolation().name


def _describe(compute) -> str:
    if compute == FP32:
        return "fp32"
    cast = f", {compute.autocast} autocast" if compute.autocast != "no" else ""
    return f"as trained: {compute.precision}{cast}, attention {compute.attention}"


def eval_task_run(run_dir: str, cfg: Config, out: Path, say=print) -> dict:
    """`sftlab eval` of a classification or seq2seq run: eval loss and the task's metrics on data.eval
    (overrides may point it at other data), written as OUT/metrics.json in `sftlab eval`'s layout."""
    loaded = load_run(run_dir, cfg.task, trust_remote_code=cfg.model.trust_remote_code)
    task = get_task(cfg)
    if cfg.task == "classification":  # the run's class order, whatever the data holds
        task.labels = rundir.load_labels(Path(run_dir))[0]
    _, eval_data, _ = task.load_data(loaded.tokenizer, cfg.train.seed)
    if eval_data is None:
        raise DataError(f"{run_dir}: the run has no eval data; name some: sftlab eval {run_dir} data.eval=[FILE]")
    metrics = score_eval(task, task.loss_module(loaded.model), loaded.model, loaded.tokenizer, eval_data,
                         cfg.train.batch_size, out)  # fmt: skip
    rundir.write_eval(out, str(run_dir), metrics)
    for key, value in metrics.items():
        say(f"{key:22} {value:,.4f}" if isinstance(value, float) else f"{key:22} {value}")
    return metrics


def _scorers(cfg: Config, say):
    from sftlab.evaluate.embedding import load_scorers

    return load_scorers(cfg.eval, say)


def _record(cfg: Config, source: str, base_source: str | None, results: dict, seconds: float) -> dict:
    models = {"model": {"source": source, "metrics": results["model"][0]}}
    if "base" in results:
        models["base"] = {"source": base_source, "metrics": results["base"][0]}
    record = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1), "models": models,
              "settings": asdict(cfg.eval)}  # fmt: skip
    if "base" in results:
        from sftlab.evaluate.significance import intervals

        tuned, base = results["model"][0], results["base"][0]
        record["delta"] = {k: tuned[k] - base[k] for k in tuned if k in base}
        record["intervals"] = intervals(results["base"][2], results["model"][2], cfg.eval.seed)
    return record


def _samples(inputs: EvalInputs, results: dict) -> list[dict]:
    """One row per prompt: the prompt, the reference and each model's answer, side by side."""
    rows = []
    sources = [("data.eval", inputs.references, "chat")]
    for spec, items in inputs.tasks:
        sources += [(code_label(spec, p), items, p) for p in spec.protocols]
    for name, items, protocol in sources:
        for i, item in enumerate(items):
            if protocol == "completion":  # the model saw the code prompt itself, no conversation
                row = {"source": name, "prompt": item.code["prompt"], "messages": [], "reference": item.reference}
            else:
                row = {"source": name, "prompt": item.messages[-1]["content"] if item.messages else "",
                       "messages": item.messages, "reference": item.reference}  # fmt: skip
            for label, (_, answers, _) in results.items():
                if (name, i) in answers:
                    row["answer" if label == "model" else "base_answer"] = answers[(name, i)]
            rows.append(row)
    return rows


def write_results(out: Path, record: dict, samples: list[dict] | None) -> None:
    """metrics.json, and samples.jsonl unless samples is None (kept as written)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    if samples is None:
        return
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def better(key: str, delta: float) -> bool:
    return delta < 0 if key.endswith(LOWER_IS_BETTER) else delta > 0


def format_table(record: dict) -> str:
    """A plain-text table: metric, base, model, delta (▲/▼ better/worse) and its 95% interval, `~` where the
    delta is not significant."""
    tuned = record["models"]["model"]["metrics"]
    base = record["models"].get("base", {}).get("metrics")
    head = f"{'base':>10} {'tuned':>10} {'delta':>11}  95% interval" if base else f"{'value':>10}"
    lines = [f"{'metric':34} {head}"]
    for key, value in tuned.items():
        if base is None:
            lines.append(f"{key:34} {value:10.4g}")
            continue
        d = record["delta"].get(key)
        mark = "" if d is None or abs(d) < 1e-12 else (" ▲" if better(key, d) else " ▼")
        lines.append(f"{key:34} {base.get(key, float('nan')):10.4g} {value:10.4g} {d:+9.4g}{mark:2}  "
                     f"{interval_text(record.get('intervals', {}).get(key))}".rstrip())  # fmt: skip
    if base is not None and record.get("intervals"):
        lines.append("~ not significant at 95% (paired bootstrap over items; McNemar's exact test for right/wrong "
                     "scores)")  # fmt: skip
    return "\n".join(lines)


def interval_text(iv: dict | None) -> str:
    """'[low, high]' of a delta's 95% interval, with ' ~' when it is not significant; '' without one."""
    if not iv or iv.get("low") is None:
        return ""
    p = f" p={iv['p']:.2g}" if "p" in iv else ""
    return f"[{iv['low']:+.3g}, {iv['high']:+.3g}]{p}{'' if iv['significant'] else ' ~'}"
