"""`sftlab data clean`: filters, exact and near duplicates, decontamination and PII scrubbing.

Every dropped record is kept in `rejected.jsonl` with its reason; nothing is edited in place.
Near duplicates use MinHash + LSH (datasketch) over character 5-gram shingles of the normalized
user and assistant turns only, so examples that share a system prompt or boilerplate are not
mistaken for copies of each other. With a screen (curate/screen.py: a classification run), records it
flags (e.g. harmful content) are dropped too, before duplicates are looked for.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from sftlab.data.formats import Conversation

DEFAULT_REFUSALS = (
    r"\bas an ai (language )?model\b", r"\bi('m| am) (sorry|unable)[, ]+(but )?i (can(no|')t|am unable)\b",
    r"\bi cannot (help|assist) with (that|this)\b", r"\bi do not have (personal )?(opinions|feelings)\b",
    r"作为一个?(人工智能|AI)(语言模型)?", r"我无法(回答|提供|帮助)",
)  # fmt: skip
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_WORD = re.compile(r"\w+", re.UNICODE)
PII = [  # (name, pattern, placeholder); cards are Luhn-checked before replacing
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"), "[EMAIL]"),
    ("card", re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[CARD]"),
    ("ip", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), "[IP]"),
    # Not inside a longer digit run (order or account numbers): no digit group right before or after.
    ("phone", re.compile(r"(?<![\w.])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]\d{3,4}[ .-]\d{3,4}"
                         r"(?![\w.]|[ .-]\d)"), "[PHONE]"),
]


@dataclass
class CleanSettings:
    near_threshold: float = 0.8  # Jaccard similarity above which two examples are near duplicates
    num_perm: int = 128
    min_tokens: int = 1  # response tokens: the tokenizer's when given, else words (CJK characters one each)
    max_tokens: int = 0  # 0: no upper bound
    max_repeat: float = 0.5  # largest share of repeated word 3-grams in a response
    max_garbled: float = 0.1  # largest share of control/replacement/private-use characters
    refusals: tuple[str, ...] = DEFAULT_REFUSALS
    keep_languages: tuple[str, ...] = ()
    drop_languages: tuple[str, ...] = ()
    decontam_ngram: int = 13
    scrub_pii: bool = False
    tokenizer: object = None  # the run's tokenizer, for length bounds in its tokens
    screen: object = None  # a curate.screen.Screen: records its classifier flags are dropped


@dataclass
class Verdict:
    reason: str | None = None  # None: kept
    detail: str = ""
    score: float = 1.0
    signals: dict = field(default_factory=dict)


def tokens(text: str) -> list[str]:
    """Words, with each CJK character a token of its own."""
    return _WORD.findall(_CJK.sub(lambda m: f" {m.group()} ", text.casefold()))


def dialogue_text(conv: Conversation) -> str:
    if conv.text is not None:
        return conv.text
    return "\n".join(m.content for m in conv.messages if m.role != "system")


def responses(conv: Conversation) -> list[str]:
    return [conv.text] if conv.text is not None else [m.content for m in conv.messages if m.role == "assistant"]


def repeat_ratio(words: list[str], n: int = 3) -> float:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def garbled_ratio(text: str) -> float:
    bad = sum(1 for ch in text if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Co", "Cs") and ch not in "\n\t\r"))
    return bad / max(len(text), 1)


def language(text: str) -> str:
    import langid

    return langid.classify(text[:2000])[0]


def judge(conv: Conversation, s: CleanSettings, refusal_re: re.Pattern | None) -> Verdict:
    """Per-record filters, in order; the first that fails is the reason."""
    replies = responses(conv)
    words = [w for r in replies for w in tokens(r)]
    length = sum(len(s.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies) if s.tokenizer else len(words)
    signals = {"response_tokens": length, "repeat": round(repeat_ratio(words), 3),
               "garbled": round(garbled_ratio(dialogue_text(conv)), 4)}  # fmt: skip
    score = max(0.0, 1.0 - signals["repeat"] - 5 * signals["garbled"] - (0.3 if len(words) < 3 else 0.0))
    if not replies or any(not r.strip() for r in replies):
        return Verdict("empty response", "", 0.0, signals)
    if length < s.min_tokens:
        return Verdict("too short", f"{length} response tokens < {s.min_tokens}", score, signals)
    if s.max_tokens and length > s.max_tokens:
        return Verdict("too long", f"{length} response tokens > {s.max_tokens}", score, signals)
    if signals["repeat"] > s.max_repeat:
        return Verdict("repetitive", f"{signals['repeat']:.0%} of word 3-grams repeat", score, signals)
    if signals["garbled"] > s.max_garbled:
        return Verdict("garbled text", f"{signals['garbled']:.1%} unprintable characters", score, signals)
    if refusal_re is not None:
        hit = next((r for r in replies if refusal_re.search(r)), None)
        if hit is not None:
            return Verdict("refusal or boilerplate", refusal_re.search(hit).group(0), score, signals)
    if s.keep_languages or s.drop_languages:
        lang = signals["language"] = language(dialogue_text(conv))
        if (s.keep_languages and lang not in s.keep_languages) or lang in s.drop_languages:
            return Verdict("language", lang, score, signals)
    return Verdict(None, "", round(score, 3), signals)


def ngram_hashes(text: str, n: int) -> set[int]:
    words = tokens(text)
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def normalized_hash(text: str) -> str:
    return hashlib.sha1(" ".join(tokens(text)).encode()).hexdigest()


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Character n-grams of the normalized text: one changed word moves only a few of them."""
    flat = " ".join(tokens(text))
    if len(flat) <= n:
        return {flat.encode()}
    return {flat[i : i + n].encode() for i in range(len(flat) - n + 1)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def scrub(text: str) -> tuple[str, Counter]:
    found = Counter()

    def replace(name, placeholder):
        def sub(m):
            if name == "card" and not _luhn(re.sub(r"\D", "", m.group())):
                return m.group()
            found[name] += 1
            return placeholder

        return sub

    for name, pattern, placeholder in PII:
        text = pattern.sub(replace(name, placeholder), text)
    return text, found


def _luhn(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, d in enumerate(map(int, digits)):
        d = d * 2 if i % 2 == parity else d
        total += d - 9 if d > 9 else d
    return len(digits) >= 13 and total % 10 == 0


class DuplicateIndex:
    """Exact (normalized-text hash) and near duplicate lookup over the texts added so far.

    LSH below the threshold finds candidates (recall); the exact Jaccard of shingle sets decides (precision).
    """

    def __init__(self, threshold: float, num_perm: int = 128):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=max(0.3, threshold - 0.2), num_perm=num_perm)
        self.exact: dict[str, object] = {}
        self.grams: dict[object, set[bytes]] = {}

    def match(self, key, text: str, index_near: bool) -> tuple[str, list]:
        """("exact", [key]) | ("near", [keys...]) | ("", []). The text is indexed under `key` unless it
        is an exact copy, or a near one and not `index_near`."""
        from datasketch import MinHash

        digest = normalized_hash(text)
        if digest in self.exact:
            return "exact", [self.exact[digest]]
        self.exact[digest] = key
        grams = shingles(text)
        mh = MinHash(num_perm=self.num_perm, seed=1)
        mh.update_batch(list(grams))
        near = [k for k in self.lsh.query(mh) if _jaccard(grams, self.grams[k]) >= self.threshold]
        if not near or index_near:
            self.lsh.insert(key, mh)
            self.grams[key] = grams
        return ("near" if near else ""), near


def clean(conversations: list[Conversation], s: CleanSettings, contamination: set[int] = frozenset(),
          progress: bool = False) -> tuple[list[tuple[Conversation, Verdict]], list[tuple[Conversation, Verdict]]]:  # fmt: skip
    """(kept, rejected), each with its verdict; the first of a group of duplicates is the one kept.

    Filters and decontamination first, then the screen (one batched pass over what is left), then
    duplicates: a record dropped for any other reason never becomes the kept copy of its group."""
    from tqdm.auto import tqdm

    refusal_re = re.compile("|".join(f"(?:{p})" for p in s.refusals), re.IGNORECASE) if s.refusals else None
    verdicts = [_filter(conv, s, refusal_re, contamination)
                for conv in tqdm(conversations, desc="filter", unit="ex", disable=not progress)]  # fmt: skip
    if s.screen is not None:
        _screen(conversations, verdicts, s.screen, progress)
    index = DuplicateIndex(s.near_threshold, s.num_perm)
    kept, rejected = [], []
    for i, conv in enumerate(tqdm(conversations, desc="dedup", unit="ex", disable=not progress)):
        verdict = verdicts[i]
        if verdict.reason is None:
            kind, found = index.match(i, dialogue_text(conv), index_near=False)
            if kind:
                verdict = Verdict(f"{kind} duplicate", f"of {conversations[found[0]].origin}", verdict.score,
                                  verdict.signals)  # fmt: skip
        (kept if verdict.reason is None else rejected).append((conv, verdict))
    return kept, rejected


def _filter(conv: Conversation, s: CleanSettings, refusal_re: re.Pattern | None, contamination: set[int]) -> Verdict:
    verdict = judge(conv, s, refusal_re)
    if verdict.reason is None and contamination:
        shared = ngram_hashes(dialogue_text(conv), s.decontam_ngram) & contamination
        if shared:
            return Verdict("contaminated", f"shares {len(shared)} {s.decontam_ngram}-grams with eval data",
                           verdict.score, verdict.signals)  # fmt: skip
    return verdict


def _screen(conversations: list[Conversation], verdicts: list[Verdict], screen, progress: bool) -> None:
    """The classifier's verdict on each record still kept; flagged ones become "screened". Its label and
    probability go into the signals of every record it scored (scores.jsonl: how close the kept ones came)."""
    todo = [i for i, v in enumerate(verdicts) if v.reason is None]
    found = screen.score([dialogue_text(conversations[i]) for i in todo], progress=progress)
    for i, f in zip(todo, found):
        v = verdicts[i]
        v.signals.update(screen_label=f.label, screen_prob=round(f.prob, 6))
        if f.truncated:  # the classifier saw only its max length of this record
            v.signals["screen_truncated"] = True
        if f.flagged:
            verdicts[i] = Verdict("screened", f"{f.label} {f.prob:.3f} >= {screen.threshold}", v.score, v.signals)


# --------------------------------------------------------------------------- the command


def canonical(conv: Conversation) -> dict:
    if conv.text is not None:
        return {"text": conv.text}
    return {"messages": [{"role": m.role, "content": m.content} for m in conv.messages]}


def contamination_ngrams(paths: list[str], n: int) -> set[int]:
    """n-gram hashes of every string in the given eval/benchmark files (any layout we read)."""
    from sftlab.data.formats import RecordProblem, expand_paths, read_records

    found: set[int] = set()
    for path in paths:
        for file in expand_paths(path):
            for _, record in read_records(file):
                if not isinstance(record, RecordProblem):
                    for text in _strings(record):  # each field alone: no n-gram spans two fields
                        found |= ngram_hashes(text, n)
    return found


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def run_clean(inputs: list[str], output: str, settings: CleanSettings, decontaminate: list[str] = (),
              say=print) -> dict:  # fmt: skip
    """Clean every input into OUTPUT/kept.jsonl, rejected.jsonl, scores.jsonl, report.json, manifest.json."""
    import json
    import time
    from pathlib import Path

    from sftlab.curate.versions import own_id, record_entries
    from sftlab.data.formats import expand_paths, load_conversations

    started = time.perf_counter()
    conversations, files, ids = [], [], {}
    for path in inputs:
        files += expand_paths(path)
        loaded = load_conversations(path)
        conversations += loaded.conversations
        ids.update((c.origin, own_id(r)) for c, r in zip(loaded.conversations, loaded.records))
    contamination = contamination_ngrams(list(decontaminate), settings.decontam_ngram) if decontaminate else set()
    kept, rejected = clean(conversations, settings, contamination, progress=True)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    pii, written = Counter(), []
    with open(out / "kept.jsonl", "w", encoding="utf-8") as fk, open(out / "scores.jsonl", "w", encoding="utf-8") as fs:
        for conv, verdict in kept:
            record = canonical(conv)
            if settings.scrub_pii:
                record, found = _scrub_record(record)
                pii += found
            record = _with_id(record, ids.get(conv.origin))
            written.append(record)
            fk.write(json.dumps(record, ensure_ascii=False) + "\n")
            fs.write(json.dumps({"origin": conv.origin, "score": verdict.score, **verdict.signals}) + "\n")
    with open(out / "rejected.jsonl", "w", encoding="utf-8") as fr:
        for conv, verdict in rejected:
            row = {"origin": conv.origin, "reason": verdict.reason, "detail": verdict.detail, **_screened(verdict),
                   **_with_id(canonical(conv), ids.get(conv.origin))}  # fmt: skip
            fr.write(json.dumps(row, ensure_ascii=False) + "\n")
    reasons = Counter(v.reason for _, v in rejected)
    report = {"read": len(conversations), "kept": len(kept), "rejected": len(rejected), "reasons": dict(reasons),
              "pii_replaced": dict(pii), "mean_quality": round(sum(v.score for _, v in kept) / max(len(kept), 1), 3)}  # fmt: skip
    if settings.screen is not None:
        report["screen"] = _screen_counts(settings.screen, [v for _, v in kept + rejected], reasons["screened"])
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    write_manifest(out, files + [Path(p) for f in decontaminate for p in expand_paths(f)],
                   ["kept.jsonl", "rejected.jsonl", "scores.jsonl", "report.json"],
                   {"settings": _settings_dict(settings), "decontaminate": list(decontaminate)}, report,
                   record_entries([("kept.jsonl", written)]))  # fmt: skip
    seconds = time.perf_counter() - started  # printed, not written: outputs must hash the same on every run
    _say_report(report, reasons, pii, seconds, say)
    say(f"wrote {out}/kept.jsonl, rejected.jsonl (each with its reason), scores.jsonl, report.json, manifest.json")
    return report


def _with_id(record: dict, rid: str | None) -> dict:
    """The input's own `id` stays on the record, so the manifest's per-record ids can be found in the file."""
    return record if rid is None else {"id": rid, **record}


def _screened(verdict: Verdict) -> dict:
    """A screened record's rejected.jsonl row carries the flagged label and its probability."""
    if verdict.reason != "screened":
        return {}
    return {"label": verdict.signals["screen_label"], "prob": verdict.signals["screen_prob"]}


def _screen_counts(screen, verdicts: list[Verdict], flagged: int) -> dict:
    """What the screen did: records scored (those the filters kept), flagged, and cut to its max length."""
    return {"run": screen.source, "labels": screen.flagged, "threshold": screen.threshold,
            "scored": sum("screen_prob" in v.signals for v in verdicts), "flagged": flagged,
            "truncated": sum(bool(v.signals.get("screen_truncated")) for v in verdicts),
            "max_length": screen.max_length}  # fmt: skip


def _say_report(report: dict, reasons: Counter, pii: Counter, seconds: float, say) -> None:
    say(f"read {report['read']}, kept {report['kept']}, rejected {report['rejected']} ({seconds:.1f} s)")
    for reason, count in reasons.most_common():
        say(f"  {reason:26} {count}")
    if pii:
        say("  PII replaced: " + ", ".join(f"{k} {v}" for k, v in pii.items()))
    if "screen" in report:
        sc = report["screen"]
        say(f"  screen: {sc['scored']} scored by {sc['run']}, {sc['flagged']} flagged "
            f"({'/'.join(sc['labels'])} >= {sc['threshold']}), {sc['truncated']} cut to {sc['max_length']} tokens")


def _scrub_record(record: dict) -> tuple[dict, Counter]:
    found = Counter()
    if "text" in record:
        text, found = scrub(record["text"])
        return {"text": text}, found
    messages = []
    for m in record["messages"]:
        content, f = scrub(m["content"])
        found += f
        messages.append({"role": m["role"], "content": content})
    return {"messages": messages}, found


def _settings_dict(s: CleanSettings) -> dict:
    from dataclasses import fields

    # Not asdict: it deep-copies every value, the screen's model too. The two objects are described below.
    values = {f.name: getattr(s, f.name) for f in fields(s) if f.name not in ("tokenizer", "screen")}
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    if s.tokenizer is not None:  # the tokenizer changes what counts as a token: name it and its content hash
        from sftlab.data.dataset import tokenizer_fingerprint

        settings["tokenizer"] = {"name": s.tokenizer.name_or_path, "sha256": tokenizer_fingerprint(s.tokenizer)}
    if s.screen is not None:  # which classifier decided (its weights' hash), on which labels and threshold
        settings["screen"] = s.screen.describe()
    return settings


def write_manifest(out, inputs: list, outputs: list[str], settings: dict, counts: dict, records: list[dict]) -> None:
    """manifest.json: content hashes of inputs and outputs, the settings and counts, the tool version, and
    last {file, line, id, sha256} of every output record (curate/versions.py), for `sftlab data diff`."""
    from importlib.metadata import version

    from sftlab.curate.versions import RECORDS, manifest_json
    from sftlab.files import file_digest

    manifest = {"tool": f"sftlab {version('sftlab')}",
                "inputs": [{"path": str(p), "sha256": file_digest(p)} for p in inputs],
                "outputs": [{"path": name, "sha256": file_digest(out / name)} for name in outputs],
                **settings, "counts": counts, RECORDS: records}  # fmt: skip
    (out / "manifest.json").write_text(manifest_json(manifest), encoding="utf-8")
