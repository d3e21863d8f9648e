"""Conversation -> input_ids + labels, the length policy, and the per-dataset report.

Labels are built here and nowhere else: -100 marks a token that carries no loss.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

from sftlab.config import DataConfig
from sftlab.data.conversation import Conversation, RecordProblem
from sftlab.data.templates import ChatTemplate
from sftlab.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # never changed once made: `supervised` counts them once

    @cached_property
    def supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass
class DatasetReport:
    """What happened to one dataset on its way to tokens: nothing is lost without a count here."""

    name: str
    format: str = ""
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> examples
    tokens: int = 0  # tokens kept
    supervised_kept: int = 0
    supervised_lost: int = 0  # supervised tokens cut by truncation or lost with dropped examples
    length: dict = field(default_factory=dict)  # mean / p50 / p95 / max of kept examples' lengths
    warnings: list[str] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # what was done to fit the template: tools, reasoning, per-turn
    used: int | None = None  # examples one epoch draws from it (data.mixture); None before the draw
    used_supervised: int | None = None  # their supervised tokens

    def set_lengths(self, lengths: list[int]) -> None:
        s = sorted(lengths) or [0]
        pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
        self.length = {"mean": round(sum(s) / len(s), 1), "p50": pct(0.5), "p95": pct(0.95), "max": s[-1]}

    def absorb(self, part: "DatasetReport") -> None:
        """Add the counts of a part of this dataset (a chunk encoded elsewhere)."""
        for name in ("kept", "truncated", "tokens", "supervised_kept", "supervised_lost"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.dropped.update(part.dropped)
        self.notes.update(part.notes)

    def to_dict(self) -> dict:
        return {**asdict(self), "dropped": dict(self.dropped), "notes": dict(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetReport":
        return cls(**{**d, "dropped": Counter(d["dropped"]), "notes": Counter(d.get("notes", {}))})


def _probe_texts(tok) -> list[str]:
    """The texts on which a faster path must give `tok`'s own ids: fixed, so that every worker (whatever its
    first chunk) decides alike and the dataset does not depend on which worker encoded what."""
    specials = [t for t in getattr(tok, "all_special_tokens", []) if t][:4]
    texts = ["Hello world", " Hello", "\nHello\n", "  two  spaces ", "\u00fcn\u00efc\u00f6d\u00e9 123.", "end", "\t",
             "MiXeD CaSe", "x" * 40]  # fmt: skip
    return texts + [f"{t}user\nhi" for t in specials] + [f"ok {t}\n" for t in specials]


def _agreeing_backend(tok):
    """The fast tokenizer's Rust batch encoder where it gives the very ids `tok(text)` gives on the fixed probe,
    else False (a slow tokenizer, or a wrapper that changes the text before the backend sees it). Its offset-free
    variant where the tokenizers release has it: the offsets are never read here."""
    backend = getattr(tok, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is None:
        return False
    probe = _probe_texts(tok)
    try:
        own = tok(probe, add_special_tokens=False)["input_ids"]
        same = [e.ids for e in encode(probe, add_special_tokens=False)] == own
    except Exception:  # noqa: BLE001 -- a probe: whatever fails, the texts go through the tokenizer's own call
        return False
    return encode if same else False


class _Joined:
    """Each example's pieces as one sequence for the fast tokenizer, joined by a private added token and cut
    there again: the text between two added tokens is normalized, pre-tokenized and tokenized on its own, so each
    cut piece has the ids it gets alone, for one sequence an example instead of one a piece (benchmarks/RESULTS.md).
    A probe checks this per tokenizer (`_agreeing_joiner`): a pre-tokenizer that treats a sequence's first split
    apart (Metaspace's prepend_scheme 'first') breaks it."""

    MARK = "\ue000sftlab:piece\ue001"

    def __init__(self, backend):
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_str(backend.to_str())
        tok.no_truncation()  # one sequence holds every piece: the pieces alone are never truncated
        tok.no_padding()
        tok.add_special_tokens([AddedToken(self.MARK, special=True, normalized=False, lstrip=False, rstrip=False,
                                           single_word=False)])  # fmt: skip
        self.mark = tok.token_to_id(self.MARK)
        self.encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch

    def __call__(self, examples: list[list[str]], separately) -> list[list[int]]:
        """Every piece's ids in order; an example whose text holds the mark itself, or that does not cut back into
        its pieces, goes piece by piece through `separately`."""
        joined = [self.MARK.join(ex) for ex in examples]
        whole = [i for i, (ex, text) in enumerate(zip(examples, joined)) if text.count(self.MARK) == len(ex) - 1]
        out: list = [None] * len(examples)
        for i, enc in zip(whole, self.encode([joined[i] for i in whole], add_special_tokens=False)):
            ids = enc.ids
            if ids.count(self.mark) == len(examples[i]) - 1:
                out[i] = _cut(ids, self.mark)
        rest = [i for i, cut in enumerate(out) if cut is None]
        if rest:
            alone = iter(separately([piece for i in rest for piece in examples[i]]))
            for i in rest:
                out[i] = [next(alone) for _ in examples[i]]
        return [ids for cut in out for ids in cut]


def _cut(ids: list[int], mark: int) -> list[list[int]]:
    pieces, start = [], 0
    for _ in range(ids.count(mark)):
        end = ids.index(mark, start)
        pieces.append(ids[start:end])
        start = end + 1
    return pieces + [ids[start:]]


_JOINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its state, _Joined or False)


def _joiner_for(tok) -> _Joined | bool:
    """`_agreeing_joiner(tok)`, probed once per tokenizer and again where its added tokens or the splitting of
    special tokens changed since (the copy in a _Joined would not see them)."""
    try:
        state = (len(tok), bool(getattr(tok, "split_special_tokens", False)),
                 tuple(sorted((i, repr(t)) for i, t in getattr(tok, "added_tokens_decoder", {}).items())))  # fmt: skip
        seen, joined = _JOINERS.get(tok, (None, None))
    except TypeError:  # a tokenizer that is not weakly referenceable
        return _agreeing_joiner(tok)
    if seen != state:
        seen, joined = _JOINERS[tok] = state, _agreeing_joiner(tok)
    return joined


def _agreeing_joiner(tok) -> _Joined | bool:
    """`_Joined` where it gives `tok`'s own ids on a fixed probe (the same decision in every worker), else False."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str") or getattr(backend.model, "dropout", None):
        return False  # BPE dropout: the ids are drawn, so no probe decides alike in every worker
    texts = _probe_texts(tok)
    probe = [[a, b] for a, b in zip(texts, texts[1:] + texts[:1])] + [texts, texts[::-1]]
    own = lambda pieces: tok(pieces, add_special_tokens=False)["input_ids"]  # noqa: E731
    try:
        joined = _Joined(backend)
        same = joined(probe, own) == own([piece for ex in probe for piece in ex])
    except Exception:  # noqa: BLE001 -- a probe: whatever fails, the pieces go one by one
        return False
    return joined if same else False


class Encoder:
    """Tokenizes conversations piece by piece so each reply has the tokens inference would give it.

    The pieces of many conversations go to the fast tokenizer in one batch (its Rust backend, without the
    Python wrapper's per-call cost), once a probe has shown that the backend gives this tokenizer's own ids."""

    def __init__(self, tokenizer, template: ChatTemplate, train_on: str, eot_ids: set[int], reasoning: str = "train"):
        self.tok = tokenizer
        self.template = template
        self.train_on = train_on
        self.eot_ids = eot_ids
        self.reasoning = reasoning  # data.reasoning: train | drop
        self.backend = None  # the backend's batch encoder once the probe agrees; False where it does not
        self.joined = None  # a _Joined once its probe agrees; False where it does not
        self._tails: dict[tuple[int, ...], bool] = {}
        self.reset_counts()

    def reset_counts(self) -> None:
        self.missing_eot = 0  # replies whose template emits no end-of-turn token (model cannot learn to stop)
        self.eot_inside = 0  # replies whose text holds an end-of-turn token before their end
        self.notes: Counter = Counter()  # what was done to fit the template, for the report

    def encode(self, conv: Conversation) -> list[Encoded]:
        """The conversation's examples: one, or one per assistant turn where the template needs it."""
        [out] = self.encode_many([conv])
        if isinstance(out, RecordProblem):
            raise out
        return out

    def encode_many(self, convs: list[Conversation]) -> list[list[Encoded] | RecordProblem]:
        """Each conversation's examples, or the problem that keeps it out; the pieces tokenized in one batch."""
        plans: list = []
        examples: list[list[str]] = []
        for conv in convs:
            try:
                plans.append(self._plan(conv, examples))
            except RecordProblem as e:
                plans.append(e)
        ids = iter(self.piece_ids(examples))
        out = []
        for plan in plans:
            if isinstance(plan, RecordProblem):
                out.append(plan)
            elif isinstance(plan, Encoded):
                out.append([plan])
            else:
                out.append(self._examples(*plan, ids))
        return out

    def _plan(self, conv: Conversation, examples: list[list[str]]):
        """Render `conv` and queue its examples' piece texts for the batch: (conversation, rendering); a text
        record comes back encoded."""
        if conv.text is not None:  # with the tokenizer's own special tokens: its call, not the batch
            return self._whole_text(self.tok(conv.text, add_special_tokens=True)["input_ids"])
        conv = self._reasoning(conv)
        rendering = self.template.examples(conv, self.train_on)
        examples += [[seg.text for seg in segments] for segments in rendering.examples]
        return conv, rendering

    def _examples(self, conv: Conversation, rendering, ids) -> list[Encoded] | RecordProblem:
        examples = [self._encode(segments, [next(ids) for _ in segments]) for segments in rendering.examples]
        if not any(e.supervised for e in examples):
            return RecordProblem("nothing to train", "no assistant turn carries loss (each has train: false or "
                                 "weight: 0)")  # fmt: skip
        self._note(conv, rendering, examples)
        return examples

    def _whole_text(self, ids: list[int]) -> Encoded:
        """Format `text`: the text trained whole, with the tokenizer's own special tokens and an EOS."""
        if self.tok.eos_token_id is not None and ids[-1:] != [self.tok.eos_token_id]:
            ids = ids + [self.tok.eos_token_id]
        return Encoded(ids, list(ids))

    def piece_ids(self, examples: list[list[str]]) -> list[list[int]]:
        """Token ids of every piece of every example, in order: what `ids` gives them piece by piece."""
        if self.joined is None and examples:
            self.joined = _joiner_for(self.tok)
        if self.joined:
            return self.joined(examples, self.ids)
        return self.ids([piece for ex in examples for piece in ex])

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added: the same as `tokenizer(text)` gives."""
        if not texts:
            return []
        if self.backend is None:
            self.backend = _agreeing_backend(self.tok)
        if self.backend:
            return [e.ids for e in self.backend(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _encode(self, segments, pieces: list[list[int]]) -> Encoded:
        input_ids, labels = [], []
        for seg, ids in zip(segments, pieces):
            # Pieces are tokenized separately: BPE must not merge the role header into the reply.
            input_ids += ids
            if self.train_on == "all":
                labels += ids
            elif seg.response and seg.train and (self.train_on == "assistant" or seg.last):
                labels += self._reply_labels(ids)
            else:
                labels += [IGNORE] * len(ids)
        return Encoded(input_ids, labels)

    def _reply_labels(self, ids: list[int]) -> list[int]:
        """Supervise the reply through the end-of-turn token that closes it; what the template writes after
        it (a separator, an EOS after the final turn) is template text."""
        found = [ids.index(t) for t in self.eot_ids if t in ids]  # a scan in C per end-of-turn id (1-3 of them)
        eot = min(found) if found else None
        if eot is None:
            self.missing_eot += 1
            return list(ids)
        if eot + 1 < len(ids) and self._text_after(tuple(ids[eot + 1 :])):
            self.eot_inside += 1
        return ids[: eot + 1] + [IGNORE] * (len(ids) - eot - 1)

    def _text_after(self, tail: tuple[int, ...]) -> bool:
        """Whether tokens after a reply's end-of-turn are text, not template whitespace (memoized: the same few
        separators follow nearly every reply)."""
        if tail not in self._tails:
            self._tails[tail] = bool(self.tok.decode(list(tail), skip_special_tokens=True).strip())
        return self._tails[tail]

    def _reasoning(self, conv: Conversation) -> Conversation:
        turns = sum(m.reasoning is not None for m in conv.messages)
        if not turns:
            return conv
        if self.reasoning == "drop":
            self.notes["reasoning dropped (data.reasoning=drop)"] += turns
            return replace(conv, messages=tuple(replace(m, reasoning=None) for m in conv.messages))
        how = "rendered by the template" if self.template.reasoning_field else "written as <think> before the content"
        self.notes[f"reasoning trained, {how}"] += turns
        return conv

    def _note(self, conv: Conversation, rendering, examples: list[Encoded]) -> None:
        counts = {
            "tool calls (trained)": sum(len(m.tool_calls) for m in conv.messages),
            "tool results (never trained)": sum(m.role == "tool" for m in conv.messages),
            "assistant turns kept out of the loss (train: false)": sum(
                m.role == "assistant" and not m.train for m in conv.messages),
            "system text put in the first user turn (the template has no system role)": rendering.mode.merge_system,
            "content passed as text parts (the template reads parts)": rendering.mode.parts,
        }  # fmt: skip
        if rendering.per_turn:
            lengths = [len(e.input_ids) for e in examples]
            counts |= {"conversations trained one example per assistant turn (the template renders earlier "
                       "turns differently)": 1, "examples from those conversations": len(examples),
                       "tokens those examples add beyond their longest": sum(lengths) - max(lengths)}  # fmt: skip
        self.notes.update({k: int(n) for k, n in counts.items() if n})


# The drop reasons of the length policy, one set for every task (data reports count by these).
DROP_TOO_LONG = "longer than max_length (overflow: drop)"
DROP_NO_SUPERVISION = "prompt fills max_length (no supervised token left)"


def length_outcome(n: int, max_length: int, overflow: str, origin: str, part: str = "example",
                   key: str = "data.max_length") -> str:  # fmt: skip
    """The one length policy: 'kept', 'truncate' or DROP_TOO_LONG for `part` of `n` tokens under
    data.overflow; overflow=error raises, naming the record and the key to raise."""
    if n <= max_length:
        return "kept"
    if overflow == "error":
        raise DataError(f"{origin}: {part} has {n} tokens, more than {key}={max_length}. "
                        f"Raise {key}, or set data.overflow to truncate or drop.")  # fmt: skip
    return DROP_TOO_LONG if overflow == "drop" else "truncate"


def apply_length_policy(enc: Encoded, max_length: int, overflow: str, origin: str) -> tuple[Encoded | None, str]:
    """Returns (example or None, outcome) with outcome 'kept' | 'truncated' | a drop reason."""
    outcome = length_outcome(len(enc.input_ids), max_length, overflow, origin)
    if outcome != "truncate":
        return (enc if outcome == "kept" else None), outcome
    cut = Encoded(enc.input_ids[:max_length], enc.labels[:max_length])
    if cut.supervised == 0:  # only prompt would remain: nothing to learn, so drop and count it
        return None, DROP_NO_SUPERVISION
    return cut, "truncated"


@dataclass
class Chunk:
    """What encoding a run of conversations gave: its examples' columns and the counts that go into the
    dataset's report (a partial DatasetReport, summed with `absorb`)."""

    columns: dict[str, list]  # input_ids, labels, loss_weight, id, metadata (JSON text), length, supervised
    report: DatasetReport
    missing_eot: int = 0
    eot_inside: int = 0


def encode_chunk(encoder: Encoder, conversations: list[Conversation], cfg: DataConfig, weight: float = 1.0) -> Chunk:
    """Encode, apply the length policy and count; `weight` is the dataset's loss_weight (times each record's)."""
    encoder.reset_counts()
    report, kept, owners, lengths = DatasetReport(name=""), [], [], []
    for conv, encoded in zip(conversations, encoder.encode_many(conversations)):
        if isinstance(encoded, RecordProblem):  # the template cannot render this record consistently
            if cfg.on_bad_record == "error":
                raise DataError(f"{conv.origin}: {encoded}")
            report.dropped[f"bad record: {encoded.kind}"] += 1
            continue
        for enc in encoded:
            if _keep(enc, cfg, conv.origin, report, kept, lengths):
                owners.append(conv)
    report.notes.update(encoder.notes)
    columns = {"input_ids": [e.input_ids for e in kept], "labels": [e.labels for e in kept],
               "loss_weight": [weight * c.loss_weight for c in owners], "id": [c.id for c in owners],
               "metadata": [json.dumps(c.metadata, ensure_ascii=False) if c.metadata else None for c in owners],
               "length": lengths, "supervised": [e.supervised - (e.labels[0] != IGNORE) for e in kept]}  # fmt: skip
    return Chunk(columns, report, encoder.missing_eot, encoder.eot_inside)


def finish_report(report: DatasetReport, lengths, template_name: str, missing_eot: int, eot_inside: int) -> None:
    """The lengths and warnings of a dataset's report, once all its chunks are counted."""
    report.set_lengths(list(lengths))
    if missing_eot:
        report.warnings.append(f"{missing_eot} replies have no end-of-turn token after them in template "
                               f"'{template_name}': the model will not learn to stop")  # fmt: skip
    if eot_inside:
        report.warnings.append(f"{eot_inside} replies hold an end-of-turn token inside their text: "
                               "each is trained up to that token only")  # fmt: skip


def encode_dataset(encoder: Encoder, conversations, cfg: DataConfig, report: DatasetReport) -> list[Encoded]:
    """Encode in this process, apply the length policy, and fill the report. Returns the kept examples."""
    chunk = encode_chunk(encoder, list(conversations), cfg)
    report.absorb(chunk.report)
    finish_report(report, chunk.columns["length"], encoder.template.name, chunk.missing_eot, chunk.eot_inside)
    return [Encoded(i, lab) for i, lab in zip(chunk.columns["input_ids"], chunk.columns["labels"])]


def _keep(enc: Encoded, cfg: DataConfig, origin: str, report: DatasetReport, kept: list, lengths: list) -> bool:
    """The length policy for one example, counted in the report; whether it was kept."""
    out, outcome = apply_length_policy(enc, cfg.max_length, cfg.overflow, origin)
    if out is None:
        report.dropped[outcome] += 1
        report.supervised_lost += enc.supervised
        return False
    kept.append(out)
    report.kept += 1
    report.truncated += outcome == "truncated"
    report.tokens += len(out.input_ids)
    report.supervised_kept += out.supervised
    report.supervised_lost += enc.supervised - out.supervised
    lengths.append(len(out.input_ids))
    return True
