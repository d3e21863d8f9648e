"""Training mixtures (weight, epochs, max_examples) and per-dataset eval loss."""

import json

import pytest
from conftest import tiny_config, write_jsonl

from sftlab.config import DatasetSpec, load_config
from sftlab.data import mixture
from sftlab.errors import ConfigError


def _specs(*kw):
    return [DatasetSpec(path=f"d{i}.jsonl", **k) for i, k in enumerate(kw)]


def test_weights_set_each_datasets_share_of_an_epoch_of_the_usual_size():
    chosen = mixture.draw([100, 40], _specs({"weight": 3}, {"weight": 1}), seed=0)
    assert [len(c) for c in chosen] == [105, 35]  # N = 140, split 3:1
    assert len(set(chosen[0])) == 100 and chosen[0].count(0) in (1, 2)  # every example once before any twice
    assert len(set(chosen[1])) == 35  # undersampled: distinct examples
    assert mixture.draw([100, 40], _specs({"weight": 3}, {"weight": 1}), seed=0) == chosen  # deterministic
    assert mixture.draw([100, 40], _specs({"weight": 3}, {"weight": 1}), seed=1)[1] != chosen[1]


def test_epochs_repeat_or_thin_a_dataset_and_max_examples_caps_it():
    chosen = mixture.draw([10, 50, 80], _specs({"epochs": 2.5}, {"epochs": 0.5}, {"max_examples": 30}), seed=3)
    assert [len(c) for c in chosen] == [25, 25, 30]
    assert all(chosen[0].count(i) in (2, 3) for i in range(10))
    assert len(set(chosen[1])) == 25 and len(set(chosen[2])) == 30 and max(chosen[2]) < 80
    plain = mixture.draw([7, 9], _specs({}, {}), seed=0)
    assert plain == [list(range(7)), list(range(9))]  # no settings: every example once, in order, as before


def test_partial_weights_and_mixture_settings_on_eval_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="weights are set on some datasets but not on d1.jsonl"):
        mixture.draw([5, 5], _specs({"weight": 1}, {}), seed=0)
    with pytest.raises(ConfigError, match=r"data.eval\[0\]: weight and epochs shape the training mixture"):
        load_config(None, ["data.train=[a.jsonl]", "data.eval=[{path: b.jsonl, weight: 2}]"])
    with pytest.raises(ConfigError, match=r"data.train\[0\].epochs must be >= 0"):
        load_config(None, ["data.train=[{path: a.jsonl, epochs: -1}]"])


def _chats(path, word, n):
    rows = [{"messages": [{"role": "user", "content": f"{word} question {i}?"},
                          {"role": "assistant", "content": f"The {word} answer is {i * 7}."}]} for i in range(n)]  # fmt: skip
    return write_jsonl(path, rows)


def test_a_mixed_run_reports_what_each_epoch_used_and_logs_eval_loss_per_dataset(tiny_model_dir, tmp_path):
    from sftlab.loop.train import train

    a, b = _chats(tmp_path / "rivers.jsonl", "river", 30), _chats(tmp_path / "stones.jsonl", "stone", 10)
    train_spec = f"data.train=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1}}]"
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", train_spec, "data.eval_split=0.2", "train.max_steps=2")
    train(cfg, say=lambda *a, **k: None)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert [r["used"] for r in report] == [16, 16]  # 24 + 8 after the hold-out, shared 1:1
    assert all(r["used_supervised"] > 0 for r in report)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in evals if "eval_loss" in m][-1]
    assert {"eval_loss/rivers.jsonl", "eval_loss/stones.jsonl"} <= set(last)


def test_per_dataset_eval_losses_combine_token_weighted_to_the_pooled_one(tiny_model_dir, smol_tok, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    from sftlab.data.dataset import load_train_eval, supervised_tokens
    from sftlab.metrics.perplexity import eval_loss
    from sftlab.model.loss import SupervisedLoss

    a, b = _chats(tmp_path / "a.jsonl", "river", 12), _chats(tmp_path / "b.jsonl", "stone", 12)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", f"data.train=[{a}, {b}]", "data.eval_split=0.5")
    _, ev, _ = load_train_eval(cfg.data, smol_tok, 0)
    loss = SupervisedLoss(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    both = eval_loss(loss, ev, 4, smol_tok.pad_token_id)
    parts = {name: ev.select([i for i, s in enumerate(ev["source"]) if s == name]) for name in ("a.jsonl", "b.jsonl")}
    weights = {name: supervised_tokens(p) for name, p in parts.items()}
    pooled = sum(both[f"eval_loss/{n}"] * w for n, w in weights.items()) / sum(weights.values())
    assert both["eval_loss"] == pytest.approx(pooled, rel=1e-9)
    single = eval_loss(loss, datasets.Dataset.from_dict({k: ev[k] for k in ("input_ids", "labels")}), 4,
                       smol_tok.pad_token_id)  # fmt: skip
    assert both["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5) and "eval_loss/a.jsonl" not in single
