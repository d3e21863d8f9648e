"""QLoRA's 4-bit base: one kernel for training and eval, so an eval-mode forward never cuts the gradient."""

import pytest
import torch

from sftlab.config import ModelConfig


def test_gradients_reach_the_input_after_an_eval_forward(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from sftlab.model.load import load_4bit

    model = load_4bit(ModelConfig(name=str(tiny_model_dir)))
    ids = torch.tensor([[1, 9690, 198, 2683, 2]])
    model.eval()
    with torch.no_grad():
        model(ids)  # training's step-0 eval
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.float().sum().backward()
    layer0 = embeds.grad
    assert layer0 is not None and layer0.abs().sum() > 0
    # through the first layer's quantized projections, not only the residual stream
    linear = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, linear.in_features, dtype=torch.bfloat16, requires_grad=True)
    linear.eval()
    with torch.no_grad():
        linear(x.detach())
    linear.train()
    linear(x).float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
