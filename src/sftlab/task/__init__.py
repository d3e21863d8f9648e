"""`task:` what is fine-tuned: a chat causal LM, a classifier, or a seq2seq translator (sftlab.task.base)."""

from __future__ import annotations

from sftlab.config import Config
from sftlab.task.base import Task


def get_task(cfg: Config) -> Task:
    from sftlab.task.causal_lm import CausalLM
    from sftlab.task.classification import Classification
    from sftlab.task.seq2seq import Seq2Seq

    return {"causal_lm": CausalLM, "classification": Classification, "seq2seq": Seq2Seq}[cfg.task](cfg)
