"""Log-probabilities from `sftlab serve`: the completions layout lm-evaluation-harness scores with (echo,
token-id prompts) and chat's layout, equal to an independent transformers forward; and lm-eval itself."""

import json

import httpx
import pytest
import torch
from helpers import live_server


@pytest.fixture(scope="module")
def served(lively_model_dir):
    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Limits, create_app
    from sftlab.serve.engine import Engine

    engine = Engine(load_served(str(lively_model_dir)), max_batch=8)
    url, stop = live_server(create_app(engine, Limits(max_tokens=64), None, grace_s=2))
    yield {"url": url, "model": engine.served.ids[0], "dir": lively_model_dir}
    stop()


def _reference(model_dir, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain transformers forward over `ids`: [len, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_echo_with_logprobs_scores_every_prompt_token_as_a_forward_does(served):
    prompts = [[5, 17, 300, 41, 9, 1200], [7, 7, 8]]
    body = {"model": served["model"], "prompt": prompts, "max_tokens": 1, "logprobs": 2, "echo": True,
            "temperature": 0}  # fmt: skip
    out = httpx.post(served["url"] + "/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        ref = _reference(served["dir"], prompt)
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and len(lp["text_offset"]) == len(lp["tokens"])
        for i, t in enumerate(prompt[1:]):
            assert lp["token_logprobs"][i + 1] == pytest.approx(float(ref[i, t]), abs=1e-4)
            assert max(lp["top_logprobs"][i + 1].values()) == pytest.approx(float(ref[i].max()), abs=1e-4)
            assert len(lp["top_logprobs"][i + 1]) <= 2
        greedy = int(ref[-1].argmax())  # the generated token: the argmax after the whole prompt
        assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1, greedy]), abs=1e-4)
        assert choice["text"].startswith(httpx.post(served["url"] + "/detokenize", json={
            "model": served["model"], "tokens": prompt}, timeout=30).json()["prompt"])  # fmt: skip


def test_chat_logprobs_follow_the_generated_tokens(served):
    body = {"model": served["model"], "messages": [{"role": "user", "content": "name a river"}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 3}  # fmt: skip
    out = httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=60).json()
    content = out["choices"][0]["logprobs"]["content"]
    prompt = httpx.post(served["url"] + "/tokenize", json={"model": served["model"], "messages": body["messages"]},
                        timeout=30).json()["tokens"]  # fmt: skip
    assert content and len(content) <= 6
    ids = [t for t in prompt]
    for entry in content:
        ref = _reference(served["dir"], ids)[-1]
        token = int(ref.argmax())
        assert entry["logprob"] == pytest.approx(float(ref[token]), abs=1e-4)
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        ids.append(token)


def test_streamed_logprobs_add_up_to_the_whole_response(served):
    body = {"model": served["model"], "prompt": "rivers", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    whole = httpx.post(served["url"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    streamed = []
    with httpx.stream("POST", served["url"] + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                streamed += lp["token_logprobs"] if lp else []
    assert streamed == whole["token_logprobs"] and len(streamed) == 8


def test_logprobs_out_of_range_and_top_logprobs_alone_are_refused(served):
    url, model = served["url"], served["model"]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "top_logprobs": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "logprobs": 21}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "logprobs"
    r = httpx.post(url + "/tokenize", json={"model": model, "prompt": "ab", "add_special_tokens": False}, timeout=30)
    assert r.json()["count"] == len(r.json()["tokens"]) > 0


TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_through_the_server_matches_lm_eval_in_process(served, tmp_path):
    """lm-evaluation-harness's local-completions (token ids, echo, logprobs) against `sftlab serve`
    gives its in-process hf model's accuracy and log-likelihoods."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    rows = [{"question": f"Question {i}: which word fits?", "choices": ["river", "stone", "garden", "tea"],
             "answer": i % 4} for i in range(6)]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    tasks = TaskManager(include_path=str(tmp_path))
    model_dir = str(served["dir"])
    common = {"tasks": ["tiny_choice"], "task_manager": tasks, "log_samples": True, "batch_size": 2}
    local = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
                                    **common)  # fmt: skip
    remote = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={served['model']},base_url={served['url']}/v1/completions,tokenizer={model_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
        **common)  # fmt: skip
    acc = lambda r: r["results"]["tiny_choice"]["acc,none"]  # noqa: E731
    assert acc(local) == acc(remote)
    ll = lambda r: [x[0] for s in r["samples"]["tiny_choice"] for x in s["resps"] for x in [x[0]]]  # noqa: E731
    assert len(ll(local)) == len(ll(remote)) == 24
    assert ll(remote) == pytest.approx(ll(local), abs=1e-4)
