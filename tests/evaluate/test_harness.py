"""lm-evaluation-harness tasks on the tiny model (evaluate.harness), offline: YAML tasks over local files."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from sftlab.errors import ConfigError, DataError
from sftlab.evaluate.harness import HarnessSpec, harness_scores, wrap
from sftlab.rundir import load_run

pytest.importorskip("lm_eval")

WORDS = ["red", "green", "blue", "stone", "river", "cloud", "apple", "seven", "quiet", "north"]
QUESTIONS = [f"Question {i}: which word comes to mind?" for i in range(8)]
CHOICES = [[WORDS[(3 * i + j) % len(WORDS)] for j in range(3)] for i in range(8)]  # each item its own choices
ANSWERS = [i % 3 for i in range(8)]
SUMS = [f"{i}+1=" for i in range(4)]
CUSTOM_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC_Q_YAML = """include: mc.yaml
task: tiny_mc_q
doc_to_text: "Q: {{question}}\\nA:"
"""
UNSAFE_YAML = """include: mc.yaml
task: tiny_unsafe
unsafe_code: true
"""
GROUP_YAML = """group: tiny_group
task: [tiny_mc, tiny_mc_q]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""
PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
HUB_YAML = """task: tiny_hub
dataset_path: sftlab-test/absent
dataset_name: main
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
"""


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """lm-eval reads the JSON tasks through `datasets`, which caches them: in a temporary folder, not the user's."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


@pytest.fixture(scope="module")
def tiny(lively_model_dir):  # larger random weights: answers vary with the prompt
    return load_run(str(lively_model_dir))


@pytest.fixture(scope="module")
def tasks_dir(tiny, tmp_path_factory):
    """Three YAML tasks: multiple choice, generation whose even items' targets are the model's own greedy
    answers (so exact match is 1, 0, 1, 0), and one over a Hub dataset no cache holds."""
    out = tmp_path_factory.mktemp("harness-tasks")
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in zip(QUESTIONS, CHOICES, ANSWERS)]
    gen = [{"question": q, "answer": _greedy(tiny, q, 6) if i % 2 == 0 else "no such answer"}
           for i, q in enumerate(SUMS)]  # fmt: skip
    for name, rows in (("mc", mc), ("gen", gen)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "mc.yaml").write_text(MC_YAML.format(data=out / "mc.jsonl"))
    (out / "gen.yaml").write_text(GEN_YAML.format(data=out / "gen.jsonl"))
    (out / "mc_q.yaml").write_text(MC_Q_YAML)
    (out / "unsafe.yaml").write_text(UNSAFE_YAML)
    (out / "group.yaml").write_text(GROUP_YAML)
    (out / "ppl.yaml").write_text(PPL_YAML.format(data=out / "mc.jsonl"))
    (out / "hub.yaml").write_text(HUB_YAML)
    return out


def _greedy(loaded, prompt: str, tokens: int) -> str:
    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval defines it: the context's trailing whitespace moved to the
    continuation, the whole encoded and the context's tokens split off."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(whole[len(ctx) :]))


def _hand_hits(model, tok, n: int = len(QUESTIONS), template: str | None = None, chat: bool = False):
    """Each item right or wrong by total log-likelihood (acc) and per character of choice (acc_norm)."""
    acc, norm = [], []
    for q, choices, answer in list(zip(QUESTIONS, CHOICES, ANSWERS))[:n]:
        if chat:  # lm-eval renders the question as a user turn and drops the space before the choice
            msgs = [{"role": "user", "content": f"{q}\nAnswer:"}]
            context = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template)
            lls = [_loglik(model, tok, context, c) for c in choices]
        else:
            lls = [_loglik(model, tok, f"{q}\nAnswer:", f" {c}") for c in choices]
        acc.append(float(max(range(3), key=lls.__getitem__) == answer))
        norm.append(float(max(range(3), key=lambda j: lls[j] / len(choices[j])) == answer))
    return acc, norm


def test_scores_equal_the_models_own_loglikelihoods_and_greedy_answers(tiny, tasks_dir):
    spec = HarnessSpec(["tiny_mc", "tiny_gen"], include_path=str(tasks_dir))
    metrics, evidence, info = harness_scores(tiny.model, tiny.tokenizer, spec, batch_size=4)
    assert set(metrics) == {"harness/tiny_mc/acc", "harness/tiny_mc/acc_norm", "harness/tiny_gen/exact_match"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    acc, norm = _hand_hits(tiny.model, tiny.tokenizer)
    assert evidence["harness/tiny_mc/acc"].scores == acc and evidence["harness/tiny_mc/acc_norm"].scores == norm
    assert metrics["harness/tiny_mc/acc"] == pytest.approx(sum(acc) / len(acc))
    assert evidence["harness/tiny_gen/exact_match"].scores == [1.0, 0.0, 1.0, 0.0]
    assert metrics["harness/tiny_gen/exact_match"] == 0.5
    for key, ev in evidence.items():  # one score per item, right/wrong, averaging to the metric
        assert len(ev) == (8 if "tiny_mc" in key else 4) and ev.binary
        assert ev.whole() == pytest.approx(metrics[key])
    assert info["lm_eval"] == "0.4.13" and info["task_configs"]["tiny_mc"]["items"] == 8
    assert info["task_configs"]["tiny_gen"]["output_type"] == "generate_until"
    assert info["task_configs"]["tiny_mc"]["num_fewshot"] == 0 and info["lower_is_better"] == []


def test_limit_scores_the_first_documents_only(tiny, tasks_dir):
    spec = HarnessSpec(["tiny_mc"], limit=2, include_path=str(tasks_dir))
    _, evidence, info = harness_scores(tiny.model, tiny.tokenizer, spec, batch_size=4)
    assert len(evidence["harness/tiny_mc/acc"]) == 2 and info["task_configs"]["tiny_mc"]["items"] == 2
    assert evidence["harness/tiny_mc/acc"].scores == _hand_hits(tiny.model, tiny.tokenizer, n=2)[0]


def test_a_lora_model_is_scored_with_its_adapter(lively_model_dir, tasks_dir):
    from peft import LoraConfig, get_peft_model

    base = load_run(str(lively_model_dir))
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(load_run(str(lively_model_dir)).model, lora).eval()
    acc = _hand_hits(model, base.tokenizer)[0]
    assert acc != _hand_hits(base.model, base.tokenizer)[0]  # the adapter changes answers: the check can tell
    spec = HarnessSpec(["tiny_mc"], include_path=str(tasks_dir))
    _, evidence, _ = harness_scores(model, base.tokenizer, spec, batch_size=4)
    assert evidence["harness/tiny_mc/acc"].scores == acc


def test_a_size_weighted_group_pairs_its_tasks_items(tiny, tasks_dir):
    spec = HarnessSpec(["tiny_group"], include_path=str(tasks_dir))
    metrics, evidence, info = harness_scores(tiny.model, tiny.tokenizer, spec, batch_size=4)
    group = evidence["harness/tiny_group/acc"]
    assert len(group) == 16 and group.whole() == pytest.approx(metrics["harness/tiny_group/acc"])
    assert group.scores == evidence["harness/tiny_mc/acc"].scores + evidence["harness/tiny_mc_q/acc"].scores
    assert sorted(info["groups"]["tiny_group"]) == ["tiny_mc", "tiny_mc_q"]


def test_a_corpus_metric_keeps_its_items_and_lower_is_better(tiny, tasks_dir):
    spec = HarnessSpec(["tiny_ppl"], limit=4, include_path=str(tasks_dir))
    metrics, evidence, info = harness_scores(tiny.model, tiny.tokenizer, spec, batch_size=4)
    assert set(metrics) == {"harness/tiny_ppl/word_perplexity", "harness/tiny_ppl/bits_per_byte"}
    for key, value in metrics.items():  # (log-likelihood, words or bytes) per item; the metric their aggregate
        assert value > 0 and len(evidence[key]) == 4 and evidence[key].scores is None
        assert evidence[key].whole() == pytest.approx(value)
        assert evidence[key].value([0, 0, 1, 1]) != pytest.approx(value)  # a resample is recomputed
    assert info["lower_is_better"] == sorted(metrics)


@pytest.mark.parametrize("template", [None, CUSTOM_TEMPLATE])
def test_chat_template_renders_the_prompts(tiny, tasks_dir, template):
    spec = HarnessSpec(["tiny_mc"], limit=3, include_path=str(tasks_dir), apply_chat_template=True)
    _, evidence, _ = harness_scores(tiny.model, tiny.tokenizer, spec, batch_size=4, chat_template=template)
    assert evidence["harness/tiny_mc/acc"].scores == _hand_hits(tiny.model, tiny.tokenizer, 3, template, True)[0]


def test_chat_template_needs_one():
    with pytest.raises(ConfigError, match="no chat template"):
        wrap(torch.nn.Linear(1, 1), SimpleNamespace(chat_template=None), apply_chat_template=True)


def test_the_callers_autocast_carries_into_lm_eval(tiny):
    assert wrap(tiny.model, tiny.tokenizer).mixed_precision_dtype is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm = wrap(tiny.model, tiny.tokenizer)
    assert lm.mixed_precision_dtype == torch.bfloat16 and lm.softmax_dtype == torch.float32


def test_an_unknown_task_suggests_close_names(tiny, tasks_dir):
    spec = HarnessSpec(["tiny_mcc"], include_path=str(tasks_dir))
    with pytest.raises(ConfigError, match=r"harness task 'tiny_mcc' .*did you mean tiny_mc"):
        harness_scores(tiny.model, tiny.tokenizer, spec)


def test_a_hub_dataset_absent_from_the_cache_says_how_to_fetch_it(tiny, tasks_dir, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    empty = tmp_path / "hf"
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(empty)),
                       ("HF_DATASETS_CACHE", str(empty / "datasets"))):  # fmt: skip
        monkeypatch.setenv(var, value)
    # both libraries read these once, at import: set what they already read too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", empty / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))
    spec = HarnessSpec(["tiny_hub"], include_path=str(tasks_dir))
    with pytest.raises(DataError) as e:
        harness_scores(tiny.model, tiny.tokenizer, spec)
    assert str(e.value).startswith("harness task tiny_hub: its dataset sftlab-test/absent is not in the local "
                                   "Hugging Face cache (offline); fetch it once with")  # fmt: skip
    assert "datasets.load_dataset('sftlab-test/absent', 'main')" in str(e.value) and "\n" not in str(e.value)


def test_a_task_running_model_written_code_is_refused(tiny, tasks_dir):
    spec = HarnessSpec(["tiny_unsafe"], include_path=str(tasks_dir))
    with pytest.raises(ConfigError, match=r"tiny_unsafe .*does not run lm-eval's code-executing tasks"):
        harness_scores(tiny.model, tiny.tokenizer, spec)


def test_settings_are_checked_before_anything_runs(tasks_dir):
    from sftlab.evaluate.harness import check_harness

    for spec, message in ((HarnessSpec([]), "at least one"), (HarnessSpec(["tiny_mc"], limit=0), "--limit 0"),
                          (HarnessSpec(["tiny_mc"], num_fewshot=-1), "--num-fewshot"),
                          (HarnessSpec(["tiny_mc"], include_path=str(tasks_dir / "none")), "not a folder")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            check_harness(spec)


def test_without_lm_eval_the_error_names_the_requirement(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=r"pip install 'lm-eval==0\.4\.13'"):
        harness_scores(None, None, HarnessSpec(["tiny_mc"]))


def test_sftlab_eval_compare_harness_puts_lm_evals_numbers_beside_sftlabs(lively_model_dir, tasks_dir, tmp_path,
                                                                           capsys):  # fmt: skip
    """The whole command on a LoRA run: tuned and base scored on the same local YAML task, deltas with
    McNemar intervals, the resolved task configs in metrics.json."""
    from conftest import tiny_config

    from sftlab.cli import main
    from sftlab.loop.train import train

    run = tmp_path / "run"
    train(tiny_config(lively_model_dir, run, "train.method=lora", "train.lr=5e-2", "train.max_steps=3"),
          say=lambda *a, **k: None)  # fmt: skip
    args = ["eval", str(run), "--compare", "--harness", "tiny_mc", "--include-path", str(tasks_dir), "--limit", "6"]
    assert main(args) == 0
    record = json.loads((run / "eval" / "metrics.json").read_text())
    tuned, base = record["models"]["model"]["metrics"], record["models"]["base"]["metrics"]
    assert {"harness/tiny_mc/acc", "harness/tiny_mc/acc_norm"} <= set(tuned) & set(base)
    assert all(0 <= tuned[k] <= 1 for k in tuned)  # lm-eval's own scale, as it prints them
    assert "p" in record["intervals"]["harness/tiny_mc/acc"]
    assert record["harness"]["task_configs"]["tiny_mc"]["items"] == 6
    assert "harness/tiny_mc/acc" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="name its tasks with --harness"):
        from sftlab.cli import cmd_eval

        cmd_eval(SimpleNamespace(harness=None, num_fewshot=None, limit=3, include_path=None,
                                 apply_chat_template=False))  # fmt: skip
