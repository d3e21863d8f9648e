"""`sftlab data clean`: planted duplicates, near duplicates and contamination are found; reasons, PII, manifests."""

import json
from collections import Counter

import pytest
from conftest import write_jsonl

from sftlab.cli import main
from sftlab.curate.quality import CleanSettings, clean, scrub
from sftlab.data.formats import Conversation, Message

SYSTEM = "You are a careful assistant. Answer briefly, cite nothing, and be polite to the user at all times."


def conv(user, reply, origin, system=None):
    msgs = ([Message("system", system)] if system else []) + [Message("user", user), Message("assistant", reply)]
    return Conversation(tuple(msgs), origin=origin)


def reasons(convs, **settings):
    kept, rejected = clean(convs, CleanSettings(**settings))
    return [c.origin for c, _ in kept], {c.origin: v.reason for c, v in rejected}


def test_planted_duplicates_and_near_duplicates_are_found_and_boilerplate_is_kept():
    convs = [
        conv("What is the capital of France?", "The capital of France is Paris, a city on the Seine.", "x:1"),
        conv("what is the capital of  FRANCE?", "The capital of France is Paris, a city on the Seine", "x:2"),
        conv("What is the capital of France?", "The capital of France is Paris, a city on the river Seine.", "x:3"),
        conv("Translate cat into Chinese.", "Cat is 猫.", "x:4", SYSTEM),
        conv("Translate dog into Chinese.", "Dog is 狗.", "x:5", SYSTEM),
        conv("What is the capital of Spain?", "The capital of Spain is Madrid, in the centre of the country.", "x:6"),
    ]
    kept, rejected = reasons(convs)
    assert kept == ["x:1", "x:4", "x:5", "x:6"]
    assert rejected == {"x:2": "exact duplicate", "x:3": "near duplicate"}


@pytest.mark.parametrize("reply, reason, settings", [
    ("   ", "empty response", {}),
    ("ok", "too short", {"min_tokens": 3}),
    ("one two three four five", "too long", {"max_tokens": 4}),
    ("buy now " * 20, "repetitive", {}),
    ("text \x00\x01\x02\x03\x04\x05 more", "garbled text", {}),
    ("As an AI language model, I can't share opinions.", "refusal or boilerplate", {}),
    ("作为一个人工智能语言模型，我无法回答。", "refusal or boilerplate", {}),
    ("Bonjour, je suis très content de vous voir aujourd'hui.", "language", {"keep_languages": ("en",)}),
])  # fmt: skip
def test_each_filter_and_its_reason(reply, reason, settings):
    _, rejected = reasons([conv("Say something.", reply, "f:1")], **settings)
    assert rejected == {"f:1": reason}


def test_pii_placeholders():
    text, found = scrub("Mail bob.s@example.org, call +1 415-555-0100, card 4111 1111 1111 1111, host 192.168.1.20; "
                        "order 1234 5678 9012 3456 is not a card")  # fmt: skip
    assert text == ("Mail [EMAIL], call [PHONE], card [CARD], host [IP]; order 1234 5678 9012 3456 is not a card")
    assert found == {"email": 1, "phone": 1, "card": 1, "ip": 1}


def _data(tmp_path):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}, because adding one more gives it."}
            for i in range(6)]  # fmt: skip
    rows.append(rows[0])  # exact duplicate
    rows.append({"instruction": "Name the largest planet in the solar system please.",
                 "output": "Jupiter is the largest planet in the solar system by both mass and volume."})  # fmt: skip
    rows.append({"instruction": "Contact?", "output": "Write to jane@corp.example or 10.1.2.3 for help today."})
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_clean_cli_writes_kept_rejected_report_and_manifest(tmp_path, capsys):
    data = _data(tmp_path)
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"question": "Name the largest planet in the solar system please.",
                                                    "choices": ["Mars", "Jupiter"], "answer": 1,
                                                    "explanation": "Jupiter is the largest planet in the solar system by both mass and volume."}])  # fmt: skip
    out = tmp_path / "clean"
    assert main(["data", "clean", str(data), "--output", str(out), "--decontaminate", str(bench), "--scrub-pii"]) == 0
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(kept) == 7 and {r["reason"] for r in rejected} == {"exact duplicate", "contaminated"}
    assert rejected[0]["origin"].endswith("train.jsonl:7") and rejected[0]["detail"].endswith("train.jsonl:1")
    assert "[EMAIL]" in kept[-1]["messages"][-1]["content"] and "[IP]" in kept[-1]["messages"][-1]["content"]
    report = json.loads((out / "report.json").read_text())
    assert report["reasons"] == {"exact duplicate": 1, "contaminated": 1} and report["pii_replaced"] == {"email": 1, "ip": 1}
    assert "exact duplicate" in capsys.readouterr().out
    # kept.jsonl is training data as it is
    from sftlab.data.formats import load_conversations

    assert len(load_conversations(str(out / "kept.jsonl")).conversations) == 7


def test_manifest_hashes_change_when_and_only_when_inputs_or_settings_change(tmp_path):
    data = _data(tmp_path)

    def manifest(name, *extra):
        assert main(["data", "clean", str(data), "--output", str(tmp_path / name), *extra]) == 0
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        return m["inputs"], m["outputs"], m["settings"]

    a, b = manifest("a"), manifest("b")
    assert a == b  # same inputs and settings: same hashes
    c = manifest("c", "--near-threshold", "0.9")
    assert c[0] == a[0] and c[2] != a[2]
    with open(data, "a") as f:
        f.write(json.dumps({"instruction": "New?", "output": "A new record that was not there before."}) + "\n")
    d = manifest("d")
    assert d[0] != a[0] and d[1] != a[1]


def test_bad_input_and_settings_are_clear(tmp_path, capsys):
    assert main(["data", "clean", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["data", "clean", str(_data(tmp_path)), "--output", str(tmp_path / "o"), "--near-threshold", "2"]) == 2


def _split_data(tmp_path):
    """60 distinct records (random words) plus 6 near duplicates (one word changed) of every tenth."""
    import random

    rng = random.Random(0)
    vocab = [f"w{k}" for k in range(400)]
    rows = []
    for i in range(60):
        reply = " ".join(rng.choices(vocab, k=30))
        rows.append({"instruction": f"Describe item {i}.", "output": reply, "topic": "even" if i % 2 else "odd"})
        if i % 10 == 0:
            words = reply.split()
            words[15] = "changed"
            rows.append({"instruction": f"Describe item {i}.", "output": " ".join(words), "topic": rows[-1]["topic"]})
    return write_jsonl(tmp_path / "all.jsonl", rows)


def test_split_is_deterministic_keeps_near_duplicates_together_and_stratifies(tmp_path):
    data = _split_data(tmp_path)
    args = ["data", "split", str(data), "--ratios", "0.6,0.2,0.2", "--stratify", "topic", "--seed", "3"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    parts = {}
    for name in ("train", "validation", "test"):
        text = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{name}.jsonl").read_text()  # same seed, same split
        parts[name] = [json.loads(x) for x in text.splitlines()]
    assert sum(map(len, parts.values())) == 66 and 35 <= len(parts["train"]) <= 43
    where = {}
    for name, rows in parts.items():
        for r in rows:
            where.setdefault(r["instruction"], set()).add(name)
    assert all(len(s) == 1 for s in where.values())  # the pairs share an instruction: never split apart
    for name in ("validation", "test"):
        topics = Counter(r["topic"] for r in parts[name])
        assert abs(topics["even"] - topics["odd"]) <= 2
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"] == {n: len(r) for n, r in parts.items()} and manifest["settings"]["seed"] == 3


def test_split_errors(tmp_path, capsys):
    data = _split_data(tmp_path)
    assert main(["data", "split", str(data), "--output", str(tmp_path / "o"), "--ratios", "0.5,0.2"]) == 2
    assert "summing to 1" in capsys.readouterr().err
    assert main(["data", "split", str(data), "--output", str(tmp_path / "o"), "--stratify", "colour"]) == 2
    assert "no field 'colour'" in capsys.readouterr().err


def test_stats(tmp_path, smol_tok):
    from sftlab.curate.split import run_stats

    stats = run_stats([str(_split_data(tmp_path))], smol_tok, str(tmp_path / "s"), say=lambda *a: None)
    assert stats["records"] == 66 and stats["duplicate_rate"] == pytest.approx(6 / 66, abs=1e-3)
    assert stats["languages"].get("en", 0) > 50 and stats["tokens"]["max"] >= stats["tokens"]["p95"]
    assert (tmp_path / "s" / "lengths.png").stat().st_size > 1000


def test_stats_by_a_metadata_key_groups_counts_and_lengths(tmp_path, smol_tok, capsys):
    from sftlab.curate.split import run_stats

    rows = [{"instruction": "add " * (1 + i % 3), "output": "sum " * (4 * (i % 2) + 1),
             "metadata": {"category": "math" if i % 2 else "chat", "src": {"name": i % 3}}} for i in range(9)]
    rows.append({"instruction": "no metadata", "output": "here"})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stats = run_stats([str(path)], smol_tok, say=lambda *a: None, by="metadata.category")["by"]["metadata.category"]
    assert list(stats) == ["chat", "math", "(none)"]  # most records first
    assert [g["records"] for g in stats.values()] == [5, 4, 1]
    assert stats["math"]["tokens"]["mean"] > stats["chat"]["tokens"]["mean"]  # math replies are longer here
    lengths = [g["tokens"]["total"] for g in stats.values()]
    assert sum(lengths) == run_stats([str(path)], smol_tok, say=lambda *a: None)["tokens"]["total"]
    nested = run_stats([str(path)], smol_tok, say=lambda *a: None, by="metadata.src.name")["by"]["metadata.src.name"]
    assert {k: g["records"] for k, g in nested.items()} == {"0": 3, "1": 3, "2": 3, "(none)": 1}
    assert main(["data", "stats", str(path), "--by", "category"]) == 2
    assert "group by a metadata key, e.g. --by metadata.category" in capsys.readouterr().err


def test_a_run_records_the_manifest_of_its_cleaned_data(tmp_path, tiny_model_dir):
    from conftest import tiny_config

    from sftlab.files import file_digest
    from sftlab.loop.train import train

    assert main(["data", "clean", str(_split_data(tmp_path)), "--output", str(tmp_path / "clean")]) == 0
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "train.max_steps=1", data=tmp_path / "clean" / "kept.jsonl")
    summary = train(cfg, say=lambda *a, **k: None)
    assert summary["data_manifests"] == {str(tmp_path / "clean" / "kept.jsonl"): file_digest(tmp_path / "clean" / "manifest.json")}


def test_length_bounds_in_the_run_tokenizers_tokens(smol_tok):
    reply = "Internationalization considerations"  # 2 words, more tokens
    n = len(smol_tok(reply, add_special_tokens=False)["input_ids"])
    assert n > 2
    assert reasons([conv("Q?", reply, "t:1")], max_tokens=2)[1] == {}  # two words
    assert reasons([conv("Q?", reply, "t:1")], max_tokens=n, tokenizer=smol_tok)[1] == {}
    assert reasons([conv("Q?", reply, "t:1")], max_tokens=n - 1, tokenizer=smol_tok)[1] == {"t:1": "too long"}
