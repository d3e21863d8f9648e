"""The training loop, readable top to bottom.

    data -> batches (a step = batch_size x grad_accum x ranks examples)
         -> loss summed over supervised tokens, divided once by the step's supervised tokens (their weights)
         -> clip, AdamW, schedule -> log, eval, checkpoint -> final model in Hugging Face format

accelerate owns devices and DDP/FSDP/DeepSpeed, sftlab.speed the kernels and the precision path,
the task (sftlab.task) what is fine-tuned; the loop owns the maths and reads what the others chose.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sftlab import rundir
from sftlab.config import Config, build, validate
from sftlab.data.batching import example_lengths, plan_epoch, rows, without_weights
from sftlab.errors import SftlabError
from sftlab.evaluate.runner import reference_items
from sftlab.files import atomic_dir, remove_stale
from sftlab.generate import Sampling, generate_answers
from sftlab.loop import checkpoint
from sftlab.loop.optim import build_optimizer, build_scheduler, init_state
from sftlab.loop.tracking import MetricsLog, RunStatus, plot_curves
from sftlab.metrics.text import text_metrics
from sftlab.model.load import count_parameters, for_training, load_tokenizer
from sftlab.model.methods import StepHooks, save_trained, step_hooks
from sftlab.model.precision import resolve_precision
from sftlab.rundir import read_metrics, write_eval
from sftlab.speed import Speed, configure, sharding
from sftlab.task import Task, get_task
from sftlab.task.base import score_eval

# Keys that may change between a run and its resume without changing what was computed so far (train.fsdp_*
# lay out FSDP2's units; Distributed Checkpoint keys the shards by parameter name, whatever the units).
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.output_dir", "train.save_steps", "train.save_total_limit",
                     "train.eval_steps", "train.logging_steps", "train.report_to",
                     "train.early_stopping_patience",
                     "train.fsdp_reshard_after_forward", "train.fsdp_blocks"}  # fmt: skip
RESUMABLE_PREFIXES = ("eval.",)  # evaluation settings never change the weights (in-run generation is greedy)


class TrainError(SftlabError):
    pass


@dataclass
class RunState:
    """Everything besides weights, optimizer and RNG that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0  # non-pad tokens trained on
    supervised_tokens: int = 0
    train_time: float = 0.0
    best_eval: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    skipped_steps: int = 0


@dataclass
class Run:
    """The objects one run works with, built once by `setup`."""

    cfg: Config
    out: Path
    task: Task  # what differs between causal_lm, classification and seq2seq
    speed: Speed  # what sftlab.speed applied: precision path, kernels, batch layout
    accelerator: object
    tokenizer: object
    template_source: str | None  # the chat template trained with (None: the task has none)
    train_data: object
    eval_data: object
    model: torch.nn.Module  # the accelerate-prepared loss module (model + the task's summed loss)
    lm: torch.nn.Module  # the bare (PEFT) model, for saving
    weights: object  # what the optimizer steps and checkpoints hold (sftlab.speed.weights)
    hooks: StepHooks  # what the training method adds to a step beyond its forward (sftlab.model.methods)
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    params: tuple[int, int]
    collate: object  # rows -> model inputs, in the speed's batch layout
    references: list  # eval prompts answered every eval.generate_every steps (evaluate.benchmarks.Item)


def train(cfg: Config, resume: bool = False, overwrite: bool = False, say=print) -> dict:
    """Run (or resume) training; returns the summary that is also written to summary.json."""
    cfg = adopt_accelerate_fsdp(cfg, os.environ, say)
    launched = any(v in os.environ for v in (*WORLD_SIZE_VARS, "LOCAL_RANK"))  # then accelerate makes the group
    with sharding.one_rank_group(cfg.train.sharding == "fsdp" and not launched, torch.cuda.is_available()):
        return _train(cfg, resume, overwrite, say)


def _train(cfg: Config, resume: bool, overwrite: bool, say) -> dict:
    out = Path(cfg.train.output_dir)
    resume_from = _prepare_output_dir(out, resume, overwrite, cfg, say)
    status = RunStatus(out, enabled=_global_rank() == 0)
    try:
        run = setup(cfg, out, say)
        resume_from = _agreed_checkpoint(run.accelerator, resume_from)
        # Not before setup: under DDP another rank may still be checking that the directory is empty;
        # setup's collectives order this write after every rank's check.
        status.set("running", total_steps=run.total_steps)
        state = RunState()
        if resume_from is not None:
            if checkpoint.is_sharded(resume_from):  # each rank reads the shards it holds now
                state = RunState(**checkpoint.load_sharded(resume_from, run.model, run.optimizer.optimizer,
                                                           run.scheduler, masters=run.speed.masters))  # fmt: skip
            elif run.speed.sharded:
                raise checkpoint.CheckpointError(f"{resume_from}: a whole-model checkpoint cannot resume a sharded "
                                                 "run yet; resume it with train.sharding=none")  # fmt: skip
            else:
                state = RunState(**checkpoint.load(resume_from, run.weights, run.optimizer, run.scheduler))
                run.weights.after_load()
                run.hooks.load_state(run.lm, checkpoint.load_method_state(resume_from))
            if run.accelerator.is_main_process:
                say(f"resumed from {resume_from} at step {state.step}")
        elif run.speed.early_optimizer_state:
            init_state(run.optimizer)
        log = MetricsLog(out, cfg.train.report_to, resume_step=state.step, main=run.accelerator.is_main_process)
        try:
            outcome = loop(run, state, log, say)
        finally:
            log.close()
        summary = finish(run, state, outcome, say)
    except KeyboardInterrupt:
        status.set("interrupted", error="interrupted outside the training loop (while setting up or saving)")
        raise
    except BaseException as e:
        status.set("failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    status.set("interrupted" if outcome == "interrupted" else "finished", outcome=outcome)
    return summary


def setup(cfg: Config, out: Path, say) -> Run:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    speed = configure(cfg, resolve_precision(cfg.train.precision), _single_process())
    # accelerate keeps one precision per process; let a second run in the same process (API use,
    # tests) choose its own. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=speed.mixed_precision, cpu=speed.cpu)
    check_launch(accelerator.num_processes, os.environ, _launcher_args(), torch.cuda.is_available())
    if accelerator.num_processes > 1:
        check_same_config(_config_hashes(accelerator, cfg))
    _configure_engine(accelerator, cfg)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    task = get_task(cfg)
    train_data, eval_data, reports = task.load_data(tokenizer, cfg.train.seed)
    if accelerator.is_main_process:
        _write_run_files(out, cfg, reports)
    steps_per_epoch = math.ceil(
        len(train_data) / (cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes)
    )
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs * steps_per_epoch)
    # Under FSDP2 the shards of a full fine-tune are its fp32 masters; its policy casts them for compute.
    loaded = "fp32" if cfg.train.sharding == "fsdp" and cfg.train.method == "full" else speed.precision
    # Under FSDP2 rank 0 alone reads the weights; the other ranks build shapes and receive their shards.
    shape_only = cfg.train.sharding == "fsdp" and accelerator.process_index != 0
    lm = for_training(task.load_model(loaded, tokenizer, **({"shape_only": True} if shape_only else {})), cfg,
                      speed.precision, total)  # fmt: skip
    params = count_parameters(lm)
    weights = speed.apply(lm, accelerator, task)
    optimizer = build_optimizer(weights, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total)
    if speed.sharded:  # sharded by sftlab (speed.sharding): accelerate must not wrap the model in DDP as well
        model, optimizer = weights.model, accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(task.loss_module(lm), optimizer)  # scheduler stepped by hand
    say = say if accelerator.is_main_process else (lambda *a, **k: None)
    say(f"{cfg.train.method}: {params[0]:,} trainable of {params[1]:,} parameters "
        f"({100 * params[0] / params[1]:.2f}%); {speed.describe()}; {len(train_data)} train examples, "
        f"{total} steps of {cfg.train.batch_size}x{cfg.train.grad_accum}x{accelerator.num_processes}")  # fmt: skip
    references = reference_items(cfg, cfg.eval.generate_examples) if cfg.eval.generate_every else []
    return Run(cfg, out, task, speed, accelerator, tokenizer, task.chat_template(tokenizer), train_data, eval_data,
               model, lm, weights, step_hooks(cfg.train.method), optimizer, scheduler, total, params,
               task.collate(tokenizer.pad_token_id, speed.layout), references)  # fmt: skip


def _write_run_files(out: Path, cfg: Config, reports: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / rundir.CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    (out / rundir.DATA_REPORT).write_text(
        json.dumps({k: [r.to_dict() for r in v] for k, v in reports.items()}, ensure_ascii=False, indent=1)
    )
    _print_reports(reports)


def sharding_engine(accelerator) -> str | None:
    """'deepspeed' when accelerate's DeepSpeed shards the model (its parameters are not whole on any rank).
    FSDP is sftlab's own (run.speed.sharded): an accelerate FSDP config is adopted as train.sharding=fsdp."""
    from accelerate.utils import DistributedType

    return "deepspeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else None


def adopt_accelerate_fsdp(cfg: Config, env, say) -> Config:
    """Under `accelerate launch` with an FSDP config the run trains on sftlab's FSDP2 with that config's
    settings (speed.sharding.from_accelerate), and accelerate is kept from wrapping the model in its own."""
    settings = sharding.from_accelerate(env)
    if settings is None:
        return cfg
    why = "accelerate's fsdp_config trains on sftlab's FSDP2 (train.sharding=fsdp)"
    cfg = replace(cfg, train=replace(cfg.train, **settings))
    try:
        validate(cfg)
    except SftlabError as e:
        raise TrainError(f"{why}: {e}. To train unsharded, launch with examples/accelerate/ddp.yaml") from None
    env.pop("ACCELERATE_USE_FSDP")
    if _global_rank() == 0:
        say("accelerate's FSDP config: training on sftlab's FSDP2 with "
            + ", ".join(f"train.{k}={v}" for k, v in settings.items()))
    return cfg


def _configure_engine(accelerator, cfg: Config, env=os.environ) -> None:
    if sharding_engine(accelerator) is None:
        if env.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() == "true":  # accelerate drops it without a word
            raise TrainError("accelerate's DeepSpeed config was not applied: accelerate runs DeepSpeed on GPUs only, "
                             "and here the run would train unsharded (as DDP). On CPUs shard with FSDP2: `torchrun "
                             "--nproc_per_node N -m sftlab train CONFIG train.sharding=fsdp`, or `accelerate launch "
                             "--config_file examples/accelerate/fsdp.yaml --num_processes N -m sftlab train CONFIG`")  # fmt: skip
        return
    if cfg.train.sharding != "none":
        raise TrainError(f"train.sharding={cfg.train.sharding} and accelerate's DeepSpeed config both shard the model: "
                         "choose one (launch with torchrun, or an accelerate config without deepspeed_config)")  # fmt: skip
    refused = [name for name, on in (("train.save_steps", cfg.train.save_steps > 0), ("train.save_best", cfg.train.save_best),
                                     ("train.grad_accum > 1", cfg.train.grad_accum > 1)) if on]  # fmt: skip
    if refused:
        raise TrainError(
            f"{', '.join(refused)}: not available under deepspeed yet (its checkpoints are sharded, and DeepSpeed "
            "steps inside its engine at every backward); remove them, raise train.batch_size instead of "
            "train.grad_accum, or train with train.sharding=fsdp or DDP, which support all of them."
        )
    # No dataloader goes through prepare(), so DeepSpeed is told the micro-batch.
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=cfg.train.batch_size, gradient_accumulation_steps=1
    )


def _single_process() -> bool:
    # From the launchers' environment: asking accelerate (PartialState) before the Accelerator exists
    # would set up its process state without cpu=True. (Its FSDP flag is gone by now: adopt_accelerate_fsdp.)
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    return alone and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true"


# What accelerate reads a world size from (torchrun sets WORLD_SIZE, MPI launchers the others).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch(world: int, env, launcher_args: list[str] | None, cuda: bool) -> None:
    """Stop when the launcher asked for another number of processes than the run sees: `accelerate launch
    --cpu --num_processes N` starts one process, which would train alone at 1/N of the global batch."""
    asked = _asked_processes(env, launcher_args)
    if asked is None or asked[0] == world:
        return
    n, source = asked
    how = f"`torchrun --nproc_per_node {n or 2} -m sftlab train CONFIG`"
    how += (f" or `accelerate launch --multi_gpu --num_processes {n or 2} -m sftlab train CONFIG`" if cuda else
            " (on CPU, `accelerate launch --cpu` starts a single process whatever --num_processes says)")  # fmt: skip
    raise TrainError(f"{source}, but this run sees a world of {world} process{'es' * (world != 1)}: it would "
                     f"not train the run you asked for. Launch with {how}.")  # fmt: skip


def _asked_processes(env, launcher_args: list[str] | None) -> tuple[int, str] | None:
    """(processes the launcher asked for, where that shows; 0: more than one), or None where no launcher
    asked for a number."""
    for var in WORLD_SIZE_VARS:
        if env.get(var, "").strip().isdigit():
            return int(env[var]), f"the launcher started {env[var]} processes ({var}={env[var]})"
    # accelerate launch sets no world size, but MASTER_ADDR/MASTER_PORT only when asked for more than one
    if "ACCELERATE_MIXED_PRECISION" not in env or not env.get("MASTER_PORT"):
        return None
    n, machines = (_flag(launcher_args or [], f) for f in ("num_processes", "num_machines"))
    if n is not None and n <= 1 and (machines or 1) <= 1:
        return None
    if n:
        return n, f"accelerate launch asked for {n} processes (--num_processes {n})"
    return 0, (
        "accelerate launch asked for more than one process (it sets MASTER_PORT only then; if you set "
        "MASTER_PORT yourself for a single process, unset it)"
    )


def _flag(args: list[str], name: str) -> int | None:
    """The integer value of --name (or --name-with-dashes) in a command line, or None."""
    names = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if key in names and value.strip().isdigit():
            return int(value)
    return None


def _launcher_args() -> list[str] | None:
    """The parent process's command line (Linux /proc), where accelerate launch's --num_processes shows."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _config_hashes(accelerator, cfg: Config) -> list[int]:
    """Every rank's hash of its resolved config, in rank order (one all-gather)."""
    digest = int.from_bytes(hashlib.sha256(cfg.to_yaml().encode()).digest()[:7], "big")  # fits an int64
    return accelerator.gather(torch.tensor([digest], dtype=torch.int64, device=accelerator.device)).tolist()


def check_same_config(hashes: list[int]) -> None:
    """Every rank trains the same run, or none does (each rank sees the same hashes and raises alike)."""
    differ = [str(rank) for rank, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        who = f"rank {differ[0]} differs" if len(differ) == 1 else f"ranks {', '.join(differ)} differ"
        raise TrainError(f"the ranks were given different configs: {who} from rank 0. Launch every rank with the "
                         "same config file and key=value overrides, from the same directory (relative paths "
                         "resolve against it).")  # fmt: skip


def _global_rank() -> int:
    # From the launcher's environment: _prepare_output_dir runs before the process group exists.
    return int(os.environ.get("RANK", "0"))


def loop(run: Run, state: RunState, log: MetricsLog, say) -> str:
    """Train until the last step, early stopping or a stop signal; returns which one it was."""
    cfg, acc = run.cfg.train, run.accelerator
    lengths = example_lengths(run.train_data)
    if state.step == 0 and run.eval_data is not None:
        record = {"step": 0, **eval_now(run)}  # every rank evaluates its share; rank 0 writes
        if acc.is_main_process:
            log.log(record)
    bar = _progress(run, state)
    with _StopOnSignal() as stop:
        while state.step < run.total_steps:
            plan = plan_epoch(lengths, cfg.batch_size, cfg.grad_accum, cfg.seed, state.epoch,
                              cfg.group_by_length, acc.num_processes, acc.process_index)  # fmt: skip
            for micro_batches in plan[state.step_in_epoch :]:
                started = time.perf_counter()
                record = train_step(run, micro_batches, state)
                elapsed = time.perf_counter() - started
                state.train_time += elapsed
                record["step_time_s"] = round(elapsed, 4)
                state.step += 1
                state.step_in_epoch += 1
                record["epoch"] = round(state.epoch + state.step_in_epoch / len(plan), 4)
                outcome = after_step(run, state, record, log, _any_rank(acc, stop.requested))
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                                tok_s=f"{state.tokens / max(state.train_time, 1e-9):.0f}")  # fmt: skip
                if outcome:
                    bar.close()
                    return outcome
            state.epoch += 1
            state.step_in_epoch = 0
    bar.close()
    return "completed"  # reached only when resuming a run that had already finished


def _any_rank(acc, flag: bool) -> bool:
    """Whether any rank has `flag`: a signal reaches the ranks at different moments, and a rank that
    stopped (and saved) a step before the others would leave them waiting in a collective."""
    if acc.num_processes == 1:
        return flag
    return acc.reduce(torch.tensor([float(flag)], device=acc.device), "sum").item() > 0


def train_step(run: Run, micro_batches: list[list[int]], state: RunState) -> dict:
    """One optimizer step: sum the token losses of all micro-batches, divide once by their tokens
    (by their summed loss weights when examples are weighted)."""
    acc, model = run.accelerator, run.model
    micro = [rows(run.train_data, idx) for idx in micro_batches]
    batches = [run.collate(r) for r in micro]
    total, n_step, weighted = _step_counts(run, batches)
    norm = total if total > 0 else 1.0  # a step without supervised tokens has a zero loss sum
    scale = acc.num_processes / norm  # DDP averages gradients over ranks; undo that
    loss_total = torch.zeros((), dtype=torch.float64, device=acc.device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        run.weights.begin_micro_batch(sync)
        with contextlib.nullcontext() if sync else acc.no_sync(model), acc.autocast():
            loss = model(**_to(batch, acc.device))
            objective = loss * scale
            penalty = run.hooks.penalty(run.lm) if sync else None  # with the gradient sync: once, on every rank
            if penalty is not None:
                objective = objective + penalty
        acc.backward(objective)
        loss_total += loss.detach().double()
    step_loss = acc.reduce(loss_total, "sum").item() / norm
    lr = run.scheduler.get_last_lr()[0]
    grad_norm, skipped = clip_and_step(run, step_loss, state.step + 1)
    run.hooks.after_step(run.lm, state.step + 1)
    run.optimizer.zero_grad(set_to_none=True)
    run.weights.zero_grad()
    run.scheduler.step()
    state.skipped_steps += skipped
    tokens = sum(run.task.row_tokens(x) for r in micro for x in r)
    state.tokens += int(acc.reduce(torch.tensor([tokens], device=acc.device), "sum").item())
    state.supervised_tokens += n_step
    record = {"step": state.step + 1, "loss": step_loss, "learning_rate": lr, "grad_norm": grad_norm,
              "tokens": state.tokens, "supervised_tokens": n_step}  # fmt: skip
    if weighted:
        record["loss_weight_total"] = total
    return record | ({"skipped": True} if skipped else {})


def _step_counts(run: Run, batches: list[dict]) -> tuple[float, int, bool]:
    """(loss normalizer, supervised units, whether any micro-batch is weighted) of the whole step, every
    rank, in one all-reduce. The normalizer is the task's count: the supervised units, or their summed
    loss weights where a batch carries them; the units themselves are the count of the unweighted batch."""
    local = torch.zeros(3, dtype=torch.float64)
    for b in batches:
        units = run.task.count(without_weights(b))
        norm = run.task.count(b) if "loss_weights" in b else units
        local += torch.tensor([norm, units, "loss_weights" in b], dtype=torch.float64)
    norm, units, weighted = run.accelerator.reduce(local.to(run.accelerator.device), "sum").tolist()
    return norm, int(units), weighted > 0


def clip_and_step(run: Run, step_loss: float, step: int) -> tuple[float, bool]:
    """Clip to train.max_grad_norm and take the optimizer step unless the step is not finite;
    returns (gradient norm before clipping, skipped)."""
    cfg = run.cfg.train
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = run.weights.clip(max_norm)  # None under DeepSpeed, which clips inside its engine
    grad_norm = float(norm) if norm is not None else float("nan")
    skipped = not (math.isfinite(step_loss) and (norm is None or math.isfinite(grad_norm)))
    if skipped and cfg.on_nonfinite == "error":
        raise TrainError(
            f"step {step}: the loss is {step_loss} (grad norm {grad_norm}). Lower train.lr, keep "
            "train.max_grad_norm > 0, try train.precision=fp32, or set train.on_nonfinite=skip to skip such steps."
        )
    if skipped:
        return grad_norm, True
    run.weights.optimizer_step(run.optimizer)
    return grad_norm, False


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def after_step(run: Run, state: RunState, record: dict, log: MetricsLog, stop_requested: bool) -> str | None:
    """Log, evaluate, checkpoint; returns an outcome when the run should end now."""
    cfg, step = run.cfg.train, state.step
    last = step >= run.total_steps
    if step % cfg.logging_steps and not last:
        record = {"step": step}
    record["tokens_per_s"] = round(state.tokens / max(state.train_time, 1e-9), 1)
    outcome = None
    if run.eval_data is not None and (last or (cfg.eval_steps and step % cfg.eval_steps == 0)):
        record |= eval_now(run)
        outcome = _track_best(run, state, record["eval_loss"])
    every = run.cfg.eval.generate_every
    if run.references and (last or step % every == 0) and (run.speed.sharded or run.accelerator.is_main_process):
        record |= sample_answers(run, step)  # a sharded model's forwards are collective: every rank generates
    if len(record) > 2 and run.accelerator.is_main_process:
        log.log(record)
    if stop_requested:
        outcome = "interrupted"
    if outcome == "interrupted" or (cfg.save_steps and step % cfg.save_steps == 0):
        save_checkpoint(run, state)
    return outcome or ("completed" if last else None)


def eval_now(run: Run) -> dict:
    """Eval loss over every rank's share; classification/seq2seq metrics too, their files in eval/."""
    return score_eval(run.task, run.model, run.lm, run.tokenizer, run.eval_data, run.cfg.train.batch_size,
                      run.out / rundir.EVAL, run.accelerator)  # fmt: skip


def sample_answers(run: Run, step: int) -> dict:
    """Greedy answers to a few eval prompts, scored against their references and kept in generations.jsonl,
    so format drift and overfitting show up beside the eval loss."""
    rng = torch.get_rng_state()  # greedy decoding draws nothing; keep the run bit-exact regardless
    whole = sharding.unsharded_root(run.model) if run.speed.sharded else contextlib.nullcontext()
    with run.accelerator.autocast(), whole:
        answers = generate_answers(run.lm, run.tokenizer, [it.messages for it in run.references],
                                   Sampling(run.cfg.eval.max_new_tokens), run.cfg.eval.batch_size,
                                   chat_template=run.template_source, synced=bool(run.speed.sharded))  # fmt: skip
    torch.set_rng_state(rng)
    if not run.accelerator.is_main_process:
        return {}
    refs = [it.reference for it in run.references]
    with open(run.out / rundir.GENERATIONS, "a", encoding="utf-8") as f:
        for item, reply in zip(run.references, answers):
            row = {"step": step, "prompt": item.messages[-1]["content"], "reference": item.reference, "answer": reply}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    scores = text_metrics(answers, refs)
    return {f"gen_{k}": round(scores[k], 3) for k in ("bleu", "chrf", "rougeL", "exact_match")}


def _track_best(run: Run, state: RunState, loss: float) -> str | None:
    cfg = run.cfg.train
    if state.best_eval is None or loss < state.best_eval:
        state.best_eval, state.best_step, state.evals_since_best = loss, state.step, 0
        if cfg.save_best:
            weights = _trainable_weights(run)  # a sharded model's are gathered: every rank joins
            if run.accelerator.is_main_process:
                _save_best(run, state, weights)
        return None
    state.evals_since_best += 1
    if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
        return "early_stopping"
    return None


def _trainable_weights(run: Run) -> dict[str, torch.Tensor]:
    """The trained parameters, whole, by the model's own names (on rank 0; empty elsewhere)."""
    if run.speed.sharded:
        from sftlab.speed.sharding import full_state_dict

        state = _model_names(full_state_dict(run.model, trainable_only=True))
        names = {name for name, _ in run.lm.named_parameters()}  # a tied weight once, as trainable_state has it
        return {k: v for k, v in state.items() if k in names}
    return checkpoint.trainable_state(run.weights) if run.accelerator.is_main_process else {}


def _save_best(run: Run, state: RunState, weights: dict[str, torch.Tensor]) -> None:
    """best/ replaced durably, the old one renamed aside until the new one is in place (files.atomic_dir)."""
    from safetensors.torch import save_file

    kept = "best/ keeps the previous best weights" if (run.out / rundir.BEST).is_dir() else "no best/ was written yet"
    writing = atomic_dir(run.out / rundir.BEST, replace=True, durable=True)
    needed = checkpoint.tensor_bytes(weights)
    with checkpoint.full_disk_stops(run.out, f"{rundir.BEST}/ (step {state.step})", kept, needed), writing as tmp:
        save_file(weights, tmp / "trainable.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "eval_loss": state.best_eval}))


def save_checkpoint(run: Run, state: RunState) -> None:
    if run.speed.sharded:  # every rank writes its shards (Distributed Checkpoint)
        checkpoint.save_sharded(run.out / rundir.CHECKPOINTS, state.step, run.model, run.optimizer.optimizer,
                                run.scheduler, asdict(state), run.cfg.to_yaml(), run.cfg.train.save_total_limit)  # fmt: skip
        return
    if sharding_engine(run.accelerator):  # only an interrupt gets here (_configure_engine refuses save_steps)
        if run.accelerator.is_main_process:
            print(f"no checkpoint at step {state.step}: DeepSpeed checkpoints are not written yet")
        return
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        checkpoint.save(run.out / rundir.CHECKPOINTS, state.step, run.weights, run.optimizer, run.scheduler,
                        asdict(state) | {"ranks": run.accelerator.num_processes}, run.cfg.to_yaml(),
                        run.cfg.train.save_total_limit,
                        run.hooks.state(run.lm))  # fmt: skip


def finish(run: Run, state: RunState, outcome: str, say) -> dict:
    """Write the final model (HF format), summary.json and loss.png; print the summary."""
    acc = run.accelerator
    acc.wait_for_everyone()
    whole = _gathered_state(run) if outcome != "interrupted" else None  # a collective: every rank joins
    if not acc.is_main_process:
        return {}
    run.weights.release()  # the saved model carries the fp32 weights that were trained, not their bf16 rounding
    best = run.cfg.train.save_best and (run.out / rundir.BEST).is_dir()
    if best and outcome != "interrupted":
        from safetensors.torch import load_file

        restored = load_file(run.out / rundir.BEST / "trainable.safetensors")
        if whole is None:
            checkpoint.load_trainable(run.lm, restored)
        else:
            whole = _tied_again(run, _overlaid(run, whole, restored))
    if outcome != "interrupted":
        save_model(run, whole)
        if run.task.final_eval_file and run.eval_data is not None:
            _write_final_eval(run, restored_best=best)
    summary = _summary(run, state, outcome)
    (run.out / rundir.SUMMARY).write_text(json.dumps(summary, indent=1))
    if (run.out / rundir.METRICS).is_file():
        plot_curves(run.out / rundir.METRICS, run.out / rundir.LOSS_PLOT)
    say(_summary_text(summary, run.out))
    return summary


def _gathered_state(run: Run) -> dict | None:
    """The whole model's state dict gathered from FSDP/DeepSpeed shards (on rank 0), else None."""
    if run.speed.sharded:
        from sftlab.speed.sharding import full_state_dict

        state = full_state_dict(run.model)  # every rank joins; rank 0 gets the tensors
    elif sharding_engine(run.accelerator) is None:
        return None
    else:
        state = run.accelerator.get_state_dict(run.model)
    if not run.accelerator.is_main_process or state is None:
        return None
    return _tied_again(run, _model_names(state))


def _model_names(state: dict) -> dict:
    """A state dict of the loss module (SupervisedLoss: "lm.<name>") by the model's own names."""
    return {k.removeprefix("lm."): v for k, v in state.items()}


def _overlaid(run: Run, whole: dict, weights: dict) -> dict:
    unknown = sorted(set(weights) - set(whole))
    if unknown:
        raise TrainError(f"{run.out / rundir.BEST}: weights the model does not have ({unknown[:3]}); the run's "
                         "last weights are in its checkpoints")  # fmt: skip
    return whole | weights


def _tied_again(run: Run, whole: dict) -> dict:
    """Gathering copies tied weights apart; aliased again, save_pretrained drops them as it does the live model's."""
    for target, source in (getattr(run.lm, "all_tied_weights_keys", None) or {}).items():
        if target in whole and source in whole:
            whole[target] = whole[source]
    return whole


def save_model(run: Run, whole: dict | None = None) -> None:
    """The final model (a PEFT adapter, bottleneck adapters or a full model), the tokenizer and the
    training template. `whole`: the gathered state dict when an engine shards the model."""
    save_trained(run.lm, run.out, whole)
    if run.template_source is not None:
        run.tokenizer.chat_template = run.template_source  # inference renders exactly as training did
    run.tokenizer.save_pretrained(run.out)
    run.task.save_extras(run.out, run.tokenizer, run.lm)


def _write_final_eval(run: Run, restored_best: bool) -> None:
    """eval/metrics.json of the saved model: the run's last evaluation (which also wrote eval/'s other
    files), evaluated again only when the saved weights are the restored best ones."""
    if restored_best:
        record = eval_now(run)
    else:
        record = [m for m in read_metrics(run.out / rundir.METRICS) if "eval_loss" in m][-1]
    write_eval(run.out / rundir.EVAL, str(run.out), {k: v for k, v in record.items() if k.startswith("eval_")})


def _summary(run: Run, state: RunState, outcome: str) -> dict:
    metrics = read_metrics(run.out / rundir.METRICS) if (run.out / rundir.METRICS).is_file() else []
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    t = max(state.train_time, 1e-9)
    return {
        "outcome": outcome, "steps": state.step, "total_steps": run.total_steps, "method": run.cfg.train.method,
        "precision": run.speed.precision, "compute": run.speed.compute().record(),
        "trainable_params": run.params[0], "total_params": run.params[1],
        "train_time_s": round(state.train_time, 1), "tokens": state.tokens,
        "supervised_tokens": state.supervised_tokens, "tokens_per_s": round(state.tokens / t, 1),
        "supervised_tokens_per_s": round(state.supervised_tokens / t, 1),
        "final_train_loss": losses[-1] if losses else None,
        "first_eval_loss": evals[0] if evals else None, "final_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": state.best_eval, "best_step": state.best_step, "skipped_steps": state.skipped_steps,
        "data_manifests": _manifests(run.cfg),
    } | _sharding_record(run)  # fmt: skip


def _sharding_record(run: Run) -> dict:
    """Under train.sharding=fsdp: the ranks, and the parameter elements rank 0 held of the whole (measured)."""
    if not run.speed.sharded:
        return {}
    held, whole = run.speed.shard_share
    return {"sharding": {"engine": "fsdp", "ranks": run.accelerator.num_processes, "blocks": run.speed.sharded,
                         "rank0_elements": held, "elements": whole}}  # fmt: skip


def _manifests(cfg: Config) -> dict[str, str]:
    """sha256 of the manifest.json beside each dataset made by `sftlab data clean/split`: what was trained on."""
    from sftlab.files import file_digest

    found = {}
    for spec in cfg.data.train + cfg.data.eval:
        manifest = Path(spec.path).parent / "manifest.json"
        if spec.path and manifest.is_file():  # a hub dataset has no path
            found[spec.path] = file_digest(manifest)
    return found


def _summary_text(s: dict, out: Path) -> str:
    lines = [(f"{s['outcome']}: {s['steps']}/{s['total_steps']} steps in {s['train_time_s']} s, "
              f"{s['tokens_per_s']} tokens/s ({s['supervised_tokens_per_s']} supervised), "
              f"{s['supervised_tokens']:,} supervised tokens")]  # fmt: skip
    if s["first_eval_loss"] is not None:
        best = f" (best {s['best_eval_loss']:.4f} at step {s['best_step']})" if s["best_step"] else ""
        lines.append(f"eval loss {s['first_eval_loss']:.4f} -> {s['final_eval_loss']:.4f}{best}")
    what = "checkpoint for --resume" if s["outcome"] == "interrupted" else "model"
    lines.append(f"{what}, metrics.jsonl, loss.png and summary.json in {out}")
    return "\n".join(lines)


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool, cfg: Config, say=print) -> Path | None:
    """The checkpoint to resume from (the newest that verifies), or None; refuses to mix two runs in one
    directory. What a kill left behind is cleaned up first, by the main process alone."""
    main = _global_rank() == 0
    existing = [name for name in rundir.RUN_FILES if (out / name).exists()]
    if existing and not resume and not overwrite:  # before any cleanup: a live run there keeps its files
        raise TrainError(f"{out} already holds a run ({', '.join(existing)}). Pass --resume to continue it, "
                         "--overwrite to replace it, or set train.output_dir elsewhere.")  # fmt: skip
    if main:
        _remove_stale(out, say)
    if resume and not main:  # rank 0 chooses (after its clean-up) and tells the others (_agreed_checkpoint)
        return FROM_RANK0
    if resume:
        found = checkpoint.newest_verified(out / rundir.CHECKPOINTS, say)
        _check_resumable(found, cfg)
        return found
    for name in rundir.RUN_FILES if main else ():  # one process deletes: two would race each other
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return None


FROM_RANK0 = Path("(the checkpoint rank 0 chooses)")


def _agreed_checkpoint(acc, found: Path | None) -> Path | None:
    """Every rank resumes from rank 0's choice: one verification, made after its clean-up of what a kill left."""
    if acc.num_processes == 1 or found is None:
        return found
    from accelerate.utils import broadcast_object_list

    return Path(broadcast_object_list([str(found)], from_process=0)[0])


def _remove_stale(out: Path, say) -> None:
    """Temporary checkpoint and best/ directories of a killed save, and a best/ replacement cut short
    between its renames (the old best/ goes back into place)."""
    done = remove_stale(out / rundir.CHECKPOINTS, f"{checkpoint.PREFIX}*") + remove_stale(out, rundir.BEST)
    if done:
        say(f"cleaned up after an interrupted save in {out}: {', '.join(sorted(done))}")


def _check_resumable(ckpt: Path, cfg: Config) -> None:
    import yaml

    saved, now = _saved_config(yaml.safe_load((ckpt / rundir.CONFIG).read_text())), _flatten(cfg.to_dict())
    changed = sorted(
        k
        for k in saved.keys() | now.keys()
        if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_PREFIXES)
    )
    changed = _reshaped_for_ranks(ckpt, saved, now, changed)
    if changed:
        raise TrainError(f"--resume: the config differs from the checkpoint's in {', '.join(changed)}; "
                         "resuming would not continue the same run. Restore those keys or start a new run.")  # fmt: skip


def _saved_config(raw: dict) -> dict:
    """A checkpoint's config, flat, keys added since it was written at their defaults (what it ran with)."""
    try:
        return _flatten(build(Config, raw, "").to_dict())
    except SftlabError:  # a key since removed: compared as written, so it shows as a change
        return _flatten(raw)


RANK_SHAPED = ("train.batch_size", "train.grad_accum", "train.sharding")


def _reshaped_for_ranks(ckpt: Path, saved: dict, now: dict, changed: list[str]) -> list[str]:
    """`changed` less the per-rank batch, accumulation and sharding, where the checkpoint resumes on any
    number of ranks with the same global batch: each step then holds the same examples (the data plan is
    a function of the global batch), and Distributed Checkpoint reshards a sharded one. Another global
    batch, even from an unchanged config on another number of ranks, is refused."""
    ranks = json.loads((ckpt / "state.json").read_text()).get("ranks")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks is None:  # written before checkpoints recorded their ranks: its shape stays
        return changed
    was = saved["train.batch_size"] * saved["train.grad_accum"] * ranks
    is_ = now["train.batch_size"] * now["train.grad_accum"] * world
    if was != is_:
        raise TrainError(f"--resume: the checkpoint trained {was} examples a step (train.batch_size x train.grad_accum "
                         f"x {ranks} ranks); on {world} rank(s) set train.batch_size and train.grad_accum so that "
                         f"their product is {was / world:g}")  # fmt: skip
    return [k for k in changed if k not in RANK_SHAPED]


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return flat


def _print_reports(reports: dict) -> None:
    from sftlab.data.inspect import print_report, report_console

    console = report_console()
    for split, rs in reports.items():
        print_report(console, rs, f"data.{split}")


def _progress(run: Run, state: RunState):
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step",
                disable=not run.accelerator.is_main_process or None, dynamic_ncols=True)  # fmt: skip


class _StopOnSignal:
    """First Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit. Second: abort at once."""

    def __enter__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (again to abort)", flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
