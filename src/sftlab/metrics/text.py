"""Generation metrics against references: BLEU, chrF, ROUGE-1/2/L, exact match, numeric answers (and, through
metrics.library, BERTScore and METEOR).

The libraries' default tokenizers drop or glue CJK text (rouge-score keeps only [a-z0-9], sacrebleu's
13a leaves a Chinese sentence as one "word"), so CJK characters are split one per token first;
text without CJK is scored exactly as the libraries score it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Han, Hiragana, Katakana, Hangul and CJK punctuation: scored a character at a time.
_CJK = re.compile(r"([\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef])")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def split_cjk(text: str) -> str:
    return _CJK.sub(r" \1 ", text)


class MixedTokenizer:
    """rouge-score's tokenization (lowercase, alphanumeric words) plus one token per CJK character."""

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for piece in _CJK.split(text.lower()):
            if _CJK.fullmatch(piece):
                if unicodedata.category(piece).startswith("L"):  # keep characters, drop CJK punctuation
                    tokens.append(piece)
            else:
                tokens += re.sub(r"[^a-z0-9]+", " ", piece).split()
        return tokens


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu([split_cjk(p) for p in predictions], [[split_cjk(r) for r in references]]).score


def chrf(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(predictions, [references]).score  # character n-grams: no tokenizer needed


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L, in percent."""
    per = rouge_per_item(predictions, references)
    return {k: sum(v) / max(len(v), 1) for k, v in per.items()}


def rouge_per_item(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Each answer's F1 of ROUGE-1, ROUGE-2 and ROUGE-L, in percent."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), tokenizer=MixedTokenizer())
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: [100 * s[k].fmeasure for s in scores] for k in keys}


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split()).rstrip(".。!！")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percent of answers equal to the reference after case, width and whitespace normalization."""
    return 100 * sum(exact_matches(predictions, references)) / max(len(references), 1)


def exact_matches(predictions: list[str], references: list[str]) -> list[bool]:
    return [normalize(p) == normalize(r) for p, r in zip(predictions, references)]


def extract_number(text: str) -> float | None:
    """The final answer of a worked solution: the number after '####' if present, else the last number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[-1 if "####" not in text else 0].replace(",", ""))
    except ValueError:
        return None


def numeric_match(predictions: list[str], references: list[str]) -> float:
    return 100 * sum(numeric_matches(predictions, references)) / max(len(references), 1)


def numeric_matches(predictions: list[str], references: list[str]) -> list[bool]:
    """Whether each answer's final number is the reference's."""
    hits = []
    for p, r in zip(predictions, references):
        want, got = extract_number(r), extract_number(p)
        hits.append(want is not None and got is not None and abs(want - got) < 1e-6 * max(1.0, abs(want)))
    return hits


def text_metrics(predictions: list[str], references: list[str], scorers=None) -> dict[str, float]:
    """Every reference-based metric for one set of answers; `scorers` (a Scorers, or a bare sentence
    encoder) adds those it holds: semantic similarity, BERTScore, METEOR."""
    out = {"bleu": bleu(predictions, references), "chrf": chrf(predictions, references)}
    out |= rouge(predictions, references)
    out["exact_match"] = exact_match(predictions, references)
    scorers = as_scorers(scorers)
    if scorers.semantic is not None:
        out["semantic_similarity"] = 100 * scorers.semantic.similarity(predictions, references)
    if scorers.bertscore is not None:
        out |= {k: _mean(v) for k, v in scorers.bertscore.scores(predictions, references).items()}
    if scorers.meteor is not None:
        out["meteor"] = _mean(scorers.meteor.scores(predictions, references))
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


@dataclass
class Scorers:
    """An eval's model- and data-backed scorers, each loaded once; None where it is off or not installed."""

    semantic: object | None = None  # evaluate.embedding.SentenceEncoder: similarity(), similarities()
    bertscore: object | None = None  # metrics.library.BertScore
    meteor: object | None = None  # metrics.library.Meteor

    def record(self) -> dict:
        """metrics.json's account of the scorers that ran: {"bertscore": {...}, "meteor": {...}}."""
        out = {}
        if self.bertscore is not None:
            out["bertscore"] = self.bertscore.record()
        if self.meteor is not None:
            out["meteor"] = self.meteor.record()
        return out


def as_scorers(scorers) -> Scorers:
    """A Scorers from None, a Scorers, or a bare sentence encoder (semantic similarity alone)."""
    if scorers is None:
        return Scorers()
    return scorers if isinstance(scorers, Scorers) else Scorers(semantic=scorers)
