"""The analytic FLOPs of the scaling report (bench/cases_model.py), checked against the model's own
parameter counts and DeepSeek-R1's published activated-parameter figure."""

import pytest
import torch

from m1_kernels.bench.cases_model import deepseek_r1_flops_per_token, generation_flops, m1_flops_per_token
from m1_kernels.model.config import FULL, M1Config


def test_m1_flops_at_zero_context_are_twice_the_active_parameters():
    from m1_kernels.model import M1ForCausalLM
    config = M1Config.preset("minimax-m1")
    with torch.device("meta"):
        counts = M1ForCausalLM(config).parameter_counts()
    H, D, h = config.num_attention_heads, config.head_dim, config.hidden_size
    norms = config.num_hidden_layers * 2 * h + h + len(config.linear_layers) * H * D   # elementwise, not matmuls
    state_update = len(config.linear_layers) * 4 * H * D * D                             # k^T v and q S per token
    lm_head = 2 * h * config.vocab_size
    assert m1_flops_per_token(config, 0) == 2 * (counts["active"] - norms) + state_update + lm_head


def test_context_terms():
    m1 = M1Config.preset("minimax-m1")
    all_softmax = m1.replace(layer_types=[FULL] * 80)
    per_context = lambda f: f(1001) - f(1000)  # noqa: E731
    assert per_context(lambda L: m1_flops_per_token(m1, L)) == 10 * 4 * 64 * 128
    assert per_context(lambda L: m1_flops_per_token(all_softmax, L)) == 80 * 4 * 64 * 128
    assert per_context(deepseek_r1_flops_per_token) == 61 * 2 * 128 * (192 + 128)
    assert per_context(lambda L: deepseek_r1_flops_per_token(L, absorbed=True)) == 61 * 2 * 128 * (576 + 512)


def test_deepseek_r1_activated_parameters():
    # DeepSeek-V3/R1: 37B activated parameters per token; at zero context FLOPs = 2 x (those used in matmuls).
    assert 36e9 <= deepseek_r1_flops_per_token(0) / 2 <= 38e9


def test_generation_flops_is_the_sum_over_contexts():
    m1 = M1Config.preset("minimax-m1")
    f = lambda L: m1_flops_per_token(m1, L)  # noqa: E731
    assert generation_flops(f, 50) == pytest.approx(sum(f(L) for L in range(1, 51)), rel=1e-12)
    ratio_64k = generation_flops(f, 65536) / generation_flops(deepseek_r1_flops_per_token, 65536)
    assert 0.3 < ratio_64k < 0.5    # the M1 report: "less than half of DeepSeek-R1 at 64K"
