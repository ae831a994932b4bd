"""moe_ops.SparseMoE against transformers' MiniMaxSparseMoeBlock (tiny config, random weights): same
outputs and gradients, shared parameters, the HF state dict and the original per-expert names load."""

import pytest
import torch

from m1_kernels.dispatch import backend_error
from m1_kernels.model.checkpoint import convert_per_expert_state_dict
from m1_kernels.moe_ops import SparseMoE
from numerics import DEVICE

transformers = pytest.importorskip("transformers")
from transformers.models.minimax.modeling_minimax import MiniMaxSparseMoeBlock  # noqa: E402

from m1_kernels.model.hf import sparse_moe_from_hf  # noqa: E402

H, F, E, K = 32, 24, 6, 2


def hf_block(seed=0):
    config = transformers.MiniMaxConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                                        num_experts_per_tok=K, router_jitter_noise=0.0)
    torch.manual_seed(seed)
    block = MiniMaxSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block.to(DEVICE).eval()


def _use(backend):
    why = backend_error(backend, DEVICE)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_transformers_block_with_shared_weights(backend):
    _use(backend)
    block = hf_block()
    ours = sparse_moe_from_hf(block, backend=backend)
    assert ours.gate.weight is block.gate.weight and ours.experts.gate_up_proj is block.experts.gate_up_proj
    x = torch.randn(2, 5, H, device=DEVICE, requires_grad=True)
    out_hf = block(x)
    out = ours(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, out_hf, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *block.parameters()], dout)
    grads_hf = torch.autograd.grad(out_hf, [x, *block.parameters()], dout)
    for g, g_hf in zip(grads, grads_hf):
        torch.testing.assert_close(g, g_hf, rtol=1e-4, atol=1e-5)


def test_loads_hf_state_dict_and_original_per_expert_names():
    block = hf_block(1)
    x = torch.randn(1, 7, H, device=DEVICE)
    expected = block(x)

    ours = SparseMoE(H, F, E, K, backend="torch", device=DEVICE)
    ours.load_state_dict(block.state_dict())
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)

    # The original release: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down).
    original = {"block_sparse_moe.gate.weight": block.gate.weight.detach()}
    for e in range(E):
        gate_up = block.experts.gate_up_proj[e].detach()
        original[f"block_sparse_moe.experts.{e}.w1.weight"] = gate_up[:F]
        original[f"block_sparse_moe.experts.{e}.w3.weight"] = gate_up[F:]
        original[f"block_sparse_moe.experts.{e}.w2.weight"] = block.experts.down_proj[e].detach()
    converted = convert_per_expert_state_dict(original)
    assert sorted(converted) == ["block_sparse_moe.experts.down_proj", "block_sparse_moe.experts.gate_up_proj",
                                 "block_sparse_moe.gate.weight"]
    fresh = SparseMoE(H, F, E, K, backend="torch", device=DEVICE)
    fresh.load_state_dict({k.removeprefix("block_sparse_moe."): v for k, v in converted.items()})
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)

    del original["block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(ValueError, match="experts.3.w3"):
        convert_per_expert_state_dict(original)
