"""The vLLM check on tiny PEFT adapters: what vLLM's LoRA loader takes or refuses, and the serve command."""

import json
import shlex
import shutil

import pytest

from sftlab.export.merge import ExportError
from sftlab.export.vllm import check_adapter, serve_command

ALL_LINEAR = [
    "down_proj",
    "gate_proj",
    "k_proj",
    "o_proj",
    "q_proj",
    "up_proj",
    "v_proj",
]


def adapter(base_dir, out, resize=None, **lora):
    """A freshly initialised LoRA adapter of the model in base_dir, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if resize:
        model.resize_token_embeddings(resize)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    get_peft_model(model, LoraConfig(**settings)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory):
    """A random 2-layer Mistral (hidden 64): vLLM's Mistral has no LoRA on its embeddings."""
    from transformers import MistralConfig, MistralForCausalLM

    out = tmp_path_factory.mktemp("tiny-mistral")
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    MistralForCausalLM(config).save_pretrained(out)
    return out


def test_a_plain_all_linear_adapter_passes(tiny_model_dir, tmp_path):
    check = check_adapter(
        adapter(
            tiny_model_dir,
            tmp_path / "a",
            r=16,
            lora_alpha=32,
            target_modules="all-linear",
        )
    )
    assert check.ok and check.problems == [] and check.warnings == []
    assert (check.rank, check.alpha, check.target_modules) == (16, 32, ALL_LINEAR)


def test_rslora_rank_pattern_and_embedding_loras_are_accepted(tiny_model_dir, tmp_path):
    check = check_adapter(adapter(tiny_model_dir, tmp_path / "a", use_rslora=True, rank_pattern={"v_proj": 24},
                                  target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]))  # fmt: skip
    assert check.problems == []
    assert (
        check.rank == 24
    )  # rank_pattern raises the rank vLLM's --max-lora-rank must cover
    assert check.target_modules == ["embed_tokens", "lm_head", "q_proj", "v_proj"]
    # PEFT saves the base embeddings beside an embedding LoRA; vLLM skips them.
    assert (
        len(check.warnings) == 1
        and "copies of the base embeddings" in check.warnings[0]
    )


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({"modules_to_save": ["lm_head"]}, "retrain with lora.modules_to_save=[]"),
        ({"modules_to_save": ["embed_tokens"]}, "retrain with lora.modules_to_save=[]"),
        ({"use_dora": True}, "retrain with lora.use_dora=false"),
        ({"bias": "all"}, "retrain with bias='none'"),
        ({"r": 513}, "retrain with lora.r<=512"),
        ({"init_lora_weights": "pissa"}, "retrain with lora.init=default or gaussian"),
        ({"lora_bias": True}, "lora_bias=True: vLLM does not support it"),
        (
            {"trainable_token_indices": [1, 2]},
            "retrain without trainable_token_indices",
        ),
    ],
    ids=[
        "lm_head-saved",
        "embed_tokens-saved",
        "dora",
        "bias",
        "rank-513",
        "pissa",
        "lora_bias",
        "tokens",
    ],
)
def test_what_vllm_refuses_is_one_problem_that_says_what_to_do(
    tiny_model_dir, tmp_path, lora, expected
):
    check = check_adapter(adapter(tiny_model_dir, tmp_path / "a", **lora))
    assert not check.ok
    assert len(check.problems) == 1, (
        check.problems
    )  # the saved tensors are not reported a second time
    assert expected in check.problems[0] and "sftlab merge" in check.problems[0]


def test_a_module_vllm_does_not_wrap_for_the_architecture_is_a_problem(
    tiny_mistral_dir, tmp_path
):
    check = check_adapter(
        adapter(
            tiny_mistral_dir, tmp_path / "a", target_modules=["q_proj", "embed_tokens"]
        )
    )
    assert check.target_modules == ["embed_tokens", "q_proj"]
    expected = (
        "target module embed_tokens: vLLM's MistralForCausalLM has no LoRA layer for it; "
        "retrain with lora.target_modules=['q_proj']"
    )
    assert check.problems == [expected]


def test_an_embedding_lora_over_a_resized_vocabulary_is_a_problem(
    tiny_mistral_dir, tmp_path
):
    check = check_adapter(
        adapter(
            tiny_mistral_dir,
            tmp_path / "a",
            resize=136,
            target_modules=["embed_tokens"],
        )
    )
    assert any(
        "spans 136 tokens but the base model has 128" in p for p in check.problems
    )


def test_an_unknown_architecture_is_a_warning_not_a_pass(tiny_mistral_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_mistral_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**config, "architectures": ["SomethingNewForCausalLM"]})
    )
    check = check_adapter(adapter(base, tmp_path / "a"))  # AutoModel goes by model_type
    assert (
        check.ok
        and "not checked" in check.warnings[0]
        and "SomethingNewForCausalLM" in check.warnings[0]
    )


def test_other_methods_and_full_models_are_no_vllm_lora(tiny_model_dir, tmp_path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    ia3 = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        IA3Config(task_type="CAUSAL_LM"),
    )
    ia3.save_pretrained(tmp_path / "ia3")
    assert (
        "peft_type='IA3': vLLM serves only LoRA"
        in check_adapter(tmp_path / "ia3").problems[0]
    )
    assert "holds a full model" in check_adapter(tiny_model_dir).problems[0]
    assert (
        "no adapter_model.safetensors"
        in check_adapter(_config_only(tiny_model_dir, tmp_path)).problems[0]
    )


def _config_only(base, tmp_path):
    out = adapter(base, tmp_path / "bare")
    (out / "adapter_model.safetensors").unlink()
    return out


def test_a_sftlab_lora_run_passes_and_is_served_with_its_template_and_stops(
    lora_run, tmp_path
):
    check = check_adapter(lora_run)
    assert check.problems == [] and check.target_modules == ALL_LINEAR
    # vLLM serves with the base model's template and stops: where the run's differ, the flags that
    # pass the run's own (this run's chatml template already differs from the base's).
    assert all(
        "--generation-config" not in w for w in check.warnings
    )  # same stops as the base
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    warnings = check_adapter(run).warnings
    assert any(f"--chat-template {run / 'chat_template.jinja'}" in w for w in warnings)
    assert any(f"--generation-config {run}" in w for w in warnings)


@pytest.mark.parametrize(
    ("rank", "flag"), [(1, 1), (4, 8), (16, 16), (17, 32), (300, 320), (512, 512)]
)
def test_serve_command_rounds_the_rank_up_to_one_vllm_accepts(tmp_path, rank, flag):
    command = serve_command(
        "HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, "tuned", rank
    )
    assert command == (f"vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora "
                       f"--lora-modules tuned={tmp_path} --max-lora-rank {flag}")  # fmt: skip


def test_serve_command_quotes_paths_and_uses_json_where_name_path_would_not_parse(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my run").mkdir()
    args = shlex.split(serve_command("base", "my run", "tuned", 8))
    assert (
        args[args.index("--lora-modules") + 1] == f"tuned={tmp_path / 'my run'}"
    )  # absolute, one argument
    args = shlex.split(serve_command("base", "a,b", "v=2", 8))
    assert json.loads(args[args.index("--lora-modules") + 1]) == {
        "name": "v=2",
        "path": str(tmp_path / "a,b"),
    }
    with pytest.raises(ExportError, match="above 512"):
        serve_command("base", tmp_path, "tuned", 513)
