"""Screening texts with a classification run: which ones does it flag as harmful (or any label the user names)?

`sftlab data clean --screen RUN_DIR` drops the training records it flags; the server can reuse the same
object to screen its outputs, so this module knows nothing about records, files or reports:

    screen = Screen.load("runs/toxicity", threshold=0.5)   # labels: every one not named like "safe"
    for verdict in screen.score(["some text", "another"]):
        verdict.flagged, verdict.label, verdict.prob, verdict.truncated

A text is flagged when the probability of one flagged label is at least the threshold. Texts longer than
the run's data.max_length are cut to it, as training cut them, and say so (`truncated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sftlab.errors import ConfigError, ModelError

# A label named like one of these is the "nothing to flag" class; every other label is flagged by default.
SAFE_NAMES = frozenset({"safe", "ok", "clean", "benign", "none", "negative", "0"})


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    label: str  # the flagged label with the highest probability (flagged or not)
    prob: float  # its probability
    truncated: bool = False  # the text was longer than the classifier's max length and was cut


def flagged_labels(labels: Sequence[str], chosen: Sequence[str] | None, source: str = "") -> list[str]:
    """The labels that flag a text: `chosen` (checked against the run's), else all but the safe-named one(s)."""
    where = f"{source}: " if source else ""
    if chosen:
        unknown = [c for c in chosen if c not in labels]
        if unknown:
            raise ConfigError(f"{where}--screen-label {', '.join(unknown)}: not a label of this classifier "
                              f"(its labels: {', '.join(labels)})")  # fmt: skip
        return list(dict.fromkeys(chosen))
    safe = [x for x in labels if x.strip().casefold() in SAFE_NAMES]
    flagged = [x for x in labels if x not in safe]
    if not safe or not flagged:  # no label reads as "safe" (or only such labels): the user must say which flag
        raise ConfigError(f"{where}cannot tell which labels to flag from {', '.join(labels)} (none is named "
                          f"{'/'.join(sorted(SAFE_NAMES))}, or all are); name them with --screen-label LABEL...")  # fmt: skip
    return flagged


class Screen:
    """A classifier, the labels it flags and the threshold; `score` is batched, without gradients, in eval mode."""

    def __init__(self, model, tokenizer, labels: Sequence[str], flagged: Sequence[str], threshold: float = 0.5,
                 max_length: int = 512, source: str = "", batch_size: int = 32):  # fmt: skip
        if not 0 < threshold <= 1:
            raise ConfigError(f"screen threshold {threshold}: must be in (0, 1]")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.labels, self.flagged = list(labels), list(flagged)
        self.threshold, self.max_length, self.source, self.batch_size = threshold, max_length, source, batch_size
        self._columns = [self.labels.index(x) for x in self.flagged]

    @classmethod
    def load(cls, run_dir: str | Path, threshold: float = 0.5, labels: Sequence[str] | None = None, *,
             device: str | None = None, batch_size: int = 32) -> Screen:  # fmt: skip
        """A classification run (`sftlab train` with task: classification); device: cuda when there is one."""
        import torch

        from sftlab.rundir import load_labels, load_run

        _check_is_classifier(Path(run_dir))
        run_labels = load_labels(Path(run_dir))[0]
        flagged = flagged_labels(run_labels, labels, str(run_dir))  # before the model: a bad label fails at once
        loaded = load_run(str(run_dir), "classification")
        model = loaded.model
        if getattr(model, "hf_quantizer", None) is None:  # a 4-bit (qlora) base is placed by its loader; it stays
            model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, loaded.tokenizer, run_labels, flagged, threshold, loaded.cfg.data.max_length, str(run_dir),
                   batch_size)  # fmt: skip

    def score(self, texts: Sequence[str], progress: bool = False) -> list[Verdict]:
        """One verdict per text, in order."""
        from tqdm.auto import tqdm

        from sftlab.task.classification import predict_probs

        rows, truncated = self._encode(list(texts))
        verdicts: list[Verdict] = []
        chunk = self.batch_size * 32  # predict_probs sorts by length within a chunk; chunks give the progress bar
        for start in tqdm(range(0, len(rows), chunk), desc="screen", unit="chunk", disable=not progress):
            probs = predict_probs(self.model, rows[start : start + chunk], self.tokenizer.pad_token_id, self.batch_size)
            verdicts += [self._verdict(p, cut) for p, cut in zip(probs.tolist(), truncated[start : start + chunk])]
        return verdicts

    def _encode(self, texts: list[str]) -> tuple[list[dict], list[bool]]:
        """Model inputs cut to max_length the way training cut them (the tokenizer keeps its closing tokens)."""
        if not texts:
            return [], []
        full = self.tokenizer(texts, truncation=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        long = [i for i, cut in enumerate(truncated) if cut]
        encs = [{"input_ids": ids} for ids in full]
        if long:
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=self.max_length)["input_ids"]
            for i, ids in zip(long, cut):
                encs[i] = {"input_ids": ids}
        if "token_type_ids" in self.tokenizer.model_input_names:  # one segment: all zeros
            encs = [{**e, "token_type_ids": [0] * len(e["input_ids"])} for e in encs]
        return encs, truncated

    def _verdict(self, probs: list[float], truncated: bool) -> Verdict:
        col = max(self._columns, key=probs.__getitem__)
        return Verdict(probs[col] >= self.threshold, self.labels[col], probs[col], truncated)

    def describe(self) -> dict:
        """What decides the verdicts, for manifests and reports: the run, its weights' sha256, labels, threshold."""
        from sftlab.files import file_digest

        run = Path(self.source)
        weights = sorted(run.glob("*.safetensors")) + [run / "labels.json"] if self.source else []
        return {"run": self.source, "labels": self.flagged, "threshold": self.threshold, "max_length": self.max_length,
                "sha256": {p.name: file_digest(p) for p in weights if p.is_file()}}  # fmt: skip


def _check_is_classifier(run: Path) -> None:
    """Before loading anything: a chat or seq2seq run (or no run at all) is refused with what is needed."""
    from sftlab.rundir import CONFIG, is_run, read_config

    task = read_config(run).task if is_run(run) else None
    if task != "classification":
        what = f"it is a {task} run" if task else f"no {CONFIG}"
        raise ModelError(f"{run}: not a classification run ({what}); screening needs a run trained by "
                         "`sftlab train` with `task: classification`")  # fmt: skip
