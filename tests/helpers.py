"""Shared test helpers: build conversations, read supervised spans back out of labels, read a run's
losses, interrupt a run."""

import torch

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import ChatTemplate, end_of_turn_ids
from sftlab.data.tokenize import IGNORE, Encoder
from sftlab.rundir import read_metrics


def conv(*pairs, system=None):
    msgs = [Message("system", system)] if system else []
    for role, content in pairs:
        msgs.append(Message(role, content))
    return Conversation(messages=tuple(msgs), origin="test:1")


def encoder(tok, template="chatml", train_on="assistant"):
    return Encoder(tok, ChatTemplate(tok, template), train_on, end_of_turn_ids(tok))


def supervised_runs(input_ids, labels):
    """[(start, [ids...]), ...] for each maximal run of supervised tokens."""
    runs, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, list(input_ids[start:i])))
            start = None
    return runs


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def losses(out, key: str = "loss") -> list[float]:
    """A run's logged values of `key`, step by step, from its metrics.jsonl."""
    return [m[key] for m in read_metrics(out / "metrics.jsonl") if key in m]


def interrupt_during_step(monkeypatch, step: int) -> None:
    """A real SIGINT during optimizer step `step`: the handler lets the step finish, then the run saves
    a checkpoint and stops. `monkeypatch.undo()` lets later runs go on uninterrupted."""
    import os
    import signal

    import sftlab.loop.train as train_mod

    real_step = train_mod.train_step

    def step_then_signal(run, micro_batches, state):
        record = real_step(run, micro_batches, state)
        if state.step == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)


def training_model(lm, cfg, precision: str, steps: int = 10):
    """`lm` as a training run makes it: the method's wrap, then the speed settings (on CPU)."""
    from types import SimpleNamespace

    from sftlab.model.load import for_training
    from sftlab.speed import configure
    from sftlab.task import get_task

    lm = for_training(lm, cfg, precision, steps)
    configure(cfg, precision, True).apply(lm, SimpleNamespace(device=torch.device("cpu")), get_task(cfg))
    return lm


def live_server(app, limits=None):
    """Serve `app` on a free loopback port through sftlab.serve.guard's uvicorn config, in a thread.
    Returns (url, stop); call stop() to shut it down."""
    import socket
    import threading
    import time

    import uvicorn

    from sftlab.serve import guard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(guard.config(app, "127.0.0.1", port, limits or guard.HttpLimits(), grace_s=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}", stop


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(name: str, *args: str) -> list[str]:
    """The command line of this environment's `torchrun` or `accelerate` (`launch` included)."""
    import sys
    from pathlib import Path

    return [str(Path(sys.executable).parent / name), *(["launch"] if name == "accelerate" else []), *args]


def launcher_env() -> dict:
    import os
    from pathlib import Path

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def launch_together(*commands: list[str], timeout: int = 300) -> list[str]:
    """Start every command at once (the launchers of one run, e.g. one per node), wait for all; asserts each
    succeeded and that the run's rank 0 alone reported. Returns their stdouts. Output goes to files, not
    pipes: a launcher blocked on a full pipe would stall the others in their collectives."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = [(open(f"{tmp}/{i}.out", "w+"), open(f"{tmp}/{i}.err", "w+")) for i in range(len(commands))]
        procs = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=launcher_env())
                 for cmd, (out, err) in zip(commands, files)]  # fmt: skip
        try:
            for proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in procs:
                proc.kill() if proc.poll() is None else None
        outs = []
        for proc, (out, err) in zip(procs, files):
            out.seek(0), err.seek(0)
            text, error = out.read(), err.read()
            out.close(), err.close()
            assert proc.returncode == 0, error[-3000:]
            outs.append(text)
    assert sum(out.count("trainable of") for out in outs) == 1  # rank 0 alone reports
    return outs


def torchrun(config, *extra: str, nproc: int = 2) -> str:
    """`torchrun --nproc_per_node N -m sftlab train CONFIG EXTRA...` on a free port; asserts it succeeded and
    that rank 0 alone reported. Returns its stdout."""
    args = ["--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m", "sftlab", "train", str(config)]
    return launch_together(launcher("torchrun", *args, *extra))[0]
