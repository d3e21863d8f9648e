"""The lean RMSNorm: the models' own forward, less kept for backward."""

import torch


def _saved_bytes(model, ids) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.float().sum()
    return total[0]


def test_lean_rmsnorm_matches_the_models_own_and_keeps_less(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from sftlab.speed import rmsnorm

    norm = LlamaRMSNorm(16, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rmsnorm.RMSNormFunction.apply(a, w, 1e-5), (x, norm.weight))
    for dtype in (torch.float32, torch.bfloat16):  # the forward is the model's, bit for bit
        n, a = LlamaRMSNorm(16).to(dtype), x.detach().to(dtype)
        assert torch.equal(rmsnorm.RMSNormFunction.apply(a, n.weight, n.variance_epsilon), n(a))

    ids = torch.randint(0, 500, (2, 24))
    grads, saved = [], []
    for lean in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        if lean:
            assert rmsnorm.use_for_training(model) == 5  # two per layer and the final one
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
        saved.append(_saved_bytes(model.bfloat16(), ids))
    # the model's own norm computes in fp32 even in a float64 model; this one keeps float64
    assert all(float((grads[0][n] - grads[1][n]).norm() / grads[0][n].norm()) < 1e-5 for n in grads[0])
    assert saved[1] < saved[0]  # the fp32 input copies and the normalized outputs are not kept
