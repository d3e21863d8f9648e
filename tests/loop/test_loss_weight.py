"""Per-example loss weights inside the one normalizer (docs/correctness.md rule 3): a step's loss is
sum w_t CE_t / sum w_t over its supervised tokens; weights of 1 change nothing, bit for bit."""

import itertools

import pytest
import torch
from conftest import tiny_config
from helpers import losses
from safetensors.torch import load_file

import sftlab.model.loss as loss_mod
from sftlab.data.batching import collate, collate_packed, plan_epoch, supervised_count
from sftlab.loop.train import train
from sftlab.model.loss import SupervisedLoss, loss_sum
from sftlab.rundir import read_metrics
from sftlab.task.causal_lm import CausalLM

QUIET = {"say": lambda *a, **k: None}
LAYOUTS = {"padded": [], "packed": ["data.packing=true"]}
count = CausalLM(None).count  # the causal task's loss normalizer (it reads no config)


def with_weights(data, weights):
    """`data` with a float32 `loss_weight` column, as the data pipeline writes it."""
    from datasets import Value

    if "loss_weight" in data.column_names:
        data = data.remove_columns("loss_weight")
    return data.add_column("loss_weight", [float(w) for w in weights]).cast_column("loss_weight", Value("float32"))


def weigh_training_data(monkeypatch, weight_of):
    """Runs in this test train on their data with loss_weight = weight_of(example index)."""
    import sftlab.task.causal_lm as causal

    real = causal.load_train_eval

    def load(cfg, tokenizer, seed):
        train_data, eval_data, reports = real(cfg, tokenizer, seed)
        return with_weights(train_data, [weight_of(i) for i in range(len(train_data))]), eval_data, reports

    monkeypatch.setattr(causal, "load_train_eval", load)


def uneven(i: int) -> float:
    return (0.25, 1.0, 3.0, 0.5, 2.0)[i % 5]


@pytest.fixture(scope="module")
def examples(tiny_model_dir, tmp_path_factory):
    """The tokenized training set of tiny_config (every column) and its pad id."""
    from sftlab.data.dataset import load_split
    from sftlab.model.load import load_tokenizer

    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("data"))
    tok = load_tokenizer(cfg.model)
    return load_split(cfg.data, tok).dataset, tok.pad_token_id


def pick(data, idx, weights=None):
    from sftlab.data.batching import rows

    got = rows(data, idx)
    if weights is not None:
        for r, w in zip(got, weights):
            r["loss_weight"] = w
    return got


def hand_loss(model, rows) -> float:
    """sum(w * ce) / sum(w) over the rows' supervised tokens, each row alone through the plain HF forward."""
    total, norm = 0.0, 0.0
    with torch.no_grad():
        for r in rows:
            logits = model(torch.tensor([r["input_ids"]])).logits[0, :-1].double()
            target = torch.tensor(r["labels"][1:])
            ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="none")
            w = float(r.get("loss_weight", 1.0))
            total += w * float(ce.sum())
            norm += w * int((target != -100).sum())
    return total / norm


def plain_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def batch_of(layout, rows, pad_id):
    if layout == "packed":  # bins of at most 160 tokens: several examples per bin, tails of padding
        return collate_packed(rows, max_length=160, pad_id=pad_id)
    return collate(rows, pad_id)


def test_collate_adds_weights_only_when_one_differs_from_1(examples):
    data, pad_id = examples
    plain = pick(data, [0, 1, 2])
    ones = pick(data, [0, 1, 2], [1.0, 1.0, 1.0])
    for layout in LAYOUTS:
        a, b = batch_of(layout, plain, pad_id), batch_of(layout, ones, pad_id)
        assert a.keys() == b.keys() and "loss_weights" not in b
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)

    weighted = pick(data, [0, 1, 2], [0.5, 1.0, 3.0])
    padded = collate(weighted, pad_id)
    assert padded["loss_weights"].dtype == torch.float32 and padded["loss_weights"].shape == padded["labels"].shape
    expected = torch.tensor([0.5, 1.0, 3.0])[:, None] * padded["attention_mask"]  # 0 on padding
    assert torch.equal(padded["loss_weights"], expected)

    packed = collate_packed(weighted, max_length=160, pad_id=pad_id)
    ids, w = packed["input_ids"].flatten().tolist(), packed["loss_weights"].flatten().tolist()
    bounds = packed["cu_seq_lens_q"].tolist()
    assert packed["loss_weights"].shape == packed["labels"].shape
    for s, e in itertools.pairwise(bounds):  # each segment: one example (its weight) or a bin's padding (0)
        owner = [r["loss_weight"] for r in weighted if list(r["input_ids"]) == ids[s:e]]
        assert w[s:e] == [owner[0] if owner else 0.0] * (e - s)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_of_1_train_bit_for_bit_as_no_weights(tiny_model_dir, tmp_path, monkeypatch, layout):
    runs = {}
    for name in ("none", "ones"):
        if name == "ones":
            weigh_training_data(monkeypatch, lambda i: 1.0)
        out = tmp_path / name
        train(tiny_config(tiny_model_dir, out, "train.method=full", "train.max_steps=3", *LAYOUTS[layout]), **QUIET)
        runs[name] = (read_metrics(out / "metrics.jsonl"), load_file(out / "model.safetensors"))
    (m0, w0), (m1, w1) = runs["none"], runs["ones"]
    assert [r["loss"] for r in m0] == [r["loss"] for r in m1]
    assert [r["grad_norm"] for r in m0] == [r["grad_norm"] for r in m1]  # the gradients, bit for bit
    assert not any("loss_weight_total" in r for r in m1)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fast_head", [True, False])
def test_a_weighted_micro_batch_is_the_weighted_token_mean(tiny_model_dir, examples, monkeypatch, layout, fast_head):
    data, pad_id = examples
    monkeypatch.setattr(loss_mod, "_plain_head", lambda m: fast_head)  # chunked fast head, or the full logits
    model = plain_model(tiny_model_dir)
    rows = pick(data, [0, 1, 2, 3, 4], [0.5, 1.0, 3.0, 0.25, 2.0])
    batch = batch_of(layout, rows, pad_id)
    with torch.no_grad():
        ours = loss_sum(model, batch, chunk_tokens=16) / count(batch)
    expected = hand_loss(model, rows)
    assert float(ours) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - hand_loss(model, pick(data, [0, 1, 2, 3, 4]))) / expected > 1e-3  # the weights matter


def test_chunked_head_weights_its_gradients_too(tiny_model_dir, examples):
    """With the head checkpointed chunk by chunk, backward sees the weights: the gradient is that of
    the full-logits path."""
    data, pad_id = examples
    batch = collate(pick(data, [0, 1, 2], [0.5, 1.0, 3.0]), pad_id)
    grads = []
    for fast in (True, False):
        model = plain_model(tiny_model_dir).train()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loss_mod, "_plain_head", lambda m, fast=fast: fast)
            loss_sum(model, batch, chunk_tokens=16).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert float((grads[0][name] - grads[1][name]).norm() / grads[1][name].norm()) < 1e-5, name


def test_weight_2_counts_as_the_example_twice(tiny_model_dir, examples):
    data, pad_id = examples
    results = []
    for rows in (pick(data, [0, 1], [2.0, 1.0]), pick(data, [0, 0, 1])):
        model = plain_model(tiny_model_dir).train()
        batch = collate(rows, pad_id)
        loss = loss_sum(model, batch) / count(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (weighted, gw), (twice, gt) = results
    assert weighted == pytest.approx(twice, rel=1e-6)
    for name in gw:
        assert float((gw[name] - gt[name]).norm() / gt[name].norm()) < 1e-5, name


def step_records(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_a_weighted_step_is_invariant_to_its_split(tiny_model_dir, tmp_path, monkeypatch, examples):
    weigh_training_data(monkeypatch, uneven)
    split = {"b4x1": ["train.batch_size=4", "train.grad_accum=1"], "b1x4": ["train.batch_size=1", "train.grad_accum=4"]}
    for name, extra in split.items():
        train(tiny_config(tiny_model_dir, tmp_path / name, "train.method=full", *extra), **QUIET)
    a, b = step_records(tmp_path / "b4x1"), step_records(tmp_path / "b1x4")
    assert len(a) == 6
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["loss_weight_total"] for r in a] == pytest.approx([r["loss_weight_total"] for r in b], rel=1e-12)
    assert [r["supervised_tokens"] for r in a] == [r["supervised_tokens"] for r in b]

    # Step 1 runs on the initial weights: its loss is the hand-computed weighted mean of its examples, and its
    # supervised_tokens the plain count.
    data, pad_id = examples
    cfg = tiny_config(tiny_model_dir, tmp_path / "x", "train.batch_size=4")
    (first,) = plan_epoch([len(x) for x in data["input_ids"]], 4, 1, cfg.train.seed, 0, cfg.train.group_by_length)[0]
    rows = pick(data, first, [uneven(i) for i in first])
    assert a[0]["loss"] == pytest.approx(hand_loss(plain_model(tiny_model_dir), rows), rel=1e-5)
    assert a[0]["supervised_tokens"] == supervised_count(collate(rows, pad_id))
    assert type(a[0]["supervised_tokens"]) is int
    assert a[0]["loss_weight_total"] == pytest.approx(sum(r["loss_weight"] * supervised_count(collate([r], pad_id))
                                                          for r in rows), rel=1e-12)  # fmt: skip


def test_a_normalizer_below_1_is_not_rounded_up(tiny_model_dir, tmp_path, monkeypatch):
    """Every weight 1e-4: the normalizer is far below 1, and the loss is still the plain token mean."""
    train(tiny_config(tiny_model_dir, tmp_path / "plain", "train.max_steps=2"), **QUIET)
    weigh_training_data(monkeypatch, lambda i: 1e-4)
    summary = train(tiny_config(tiny_model_dir, tmp_path / "small", "train.max_steps=2"), **QUIET)
    small = step_records(tmp_path / "small")
    assert all(0 < r["loss_weight_total"] < 1 for r in small)
    assert losses(tmp_path / "small") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert summary["supervised_tokens"] == sum(r["supervised_tokens"] for r in step_records(tmp_path / "plain"))


def test_eval_loss_ignores_weights(tiny_model_dir, examples):
    from sftlab.metrics.perplexity import eval_loss

    data, pad_id = examples
    task = CausalLM(None)
    module = SupervisedLoss(plain_model(tiny_model_dir))
    results = [eval_loss(module, d, 4, pad_id, collate_fn=task.collate(pad_id), count_fn=task.count)
               for d in (data, with_weights(data, [uneven(i) for i in range(len(data))]))]  # fmt: skip
    assert results[0] == results[1]


def test_a_files_loss_weights_reach_training(tiny_model_dir, tmp_path):
    """The record field and the dataset key, through the data pipeline into the step's normalizer: a uniform
    weight cancels out of the loss (within rounding) and shows in loss_weight_total."""
    import json

    from conftest import FIXTURES

    rows = [json.loads(line) for line in (FIXTURES / "train_small.jsonl").read_text().splitlines() if line.strip()]
    weighted = tmp_path / "weighted.jsonl"
    weighted.write_text("".join(json.dumps(r | {"loss_weight": 1.5}) + "\n" for r in rows))
    train(tiny_config(tiny_model_dir, tmp_path / "plain", "train.max_steps=2"), **QUIET)
    cfg = tiny_config(tiny_model_dir, tmp_path / "w", "train.max_steps=2", data=weighted)
    cfg.data.train[0].loss_weight = 2.0
    train(cfg, **QUIET)
    m0, m1 = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "w" / "metrics.jsonl")
    steps0, steps1 = [r for r in m0 if "grad_norm" in r], [r for r in m1 if "grad_norm" in r]
    assert [r["loss"] for r in steps1] == pytest.approx([r["loss"] for r in steps0], rel=1e-5)
    assert [r["loss_weight_total"] for r in steps1] == pytest.approx([3.0 * r["supervised_tokens"] for r in steps1])
