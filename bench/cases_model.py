"""The model-level scaling report: analytic FLOPs against context, decode time against context, and
prefill / decode speed against `transformers`.

(a) Analytic forward FLOPs per generated token at context L (2 FLOPs per multiply-add; projections,
    attention over the context, lightning state update and read-out, router, the top-k experts, LM head)
    for the released MiniMax-M1, for the same model with softmax attention in every layer, and for
    DeepSeek-R1's published config (MLA in its standard, non-absorbed form, and absorbed into the latent
    space as in decode kernels); plus the total to generate N tokens (sum over contexts 1..N).
(b) Decode time per token against context (1K to 256K) of a slice of M1 that fits one GPU: real widths,
    8 layers (7 lightning + 1 softmax, as one period of the real stack), 4 experts top-2, real vocabulary;
    hybrid against the same slice with softmax attention in all 8 layers. Caches are filled with random
    states and keys (decode time does not depend on their values).
(c) Prefill and decode tokens/s of the slice on our kernels against the same weights in `transformers`.

Without a GPU, (b) and (c) run the "tiny" preset on the CPU (the torch backend): a smoke test, not speed.
"""

import functools
import math

import torch

from m1_kernels.model.checkpoint import parameters_on_meta
from m1_kernels.model.config import FULL, M1Config

from .harness import Case

CONTEXTS_GPU = (1024, 4096, 16384, 65536, 131072, 262144)
CONTEXTS_CPU = (64, 256)
GENERATION_LENGTHS = (8192, 32768, 65536, 100000, 131072)


# ------------------------------------------------------------------------------------------------------
# (a) Analytic FLOPs

def m1_flops_per_token(config: M1Config, context: int) -> float:
    """Forward FLOPs of one token that attends over `context` tokens (itself included)."""
    h, H, D, Hkv = config.hidden_size, config.num_attention_heads, config.head_dim, config.num_key_value_heads
    lightning = 2 * h * 3 * H * D + 2 * h * H * D + 2 * H * D * h + 4 * H * D * D   # qkv, gate, out; k^T v and q S
    softmax = 2 * h * (H * D + 2 * Hkv * D) + 2 * H * D * h + 4 * H * D * context    # q, k, v, o; q k^T and p v
    moe = 2 * h * config.num_local_experts + config.num_experts_per_tok * 6 * h * config.intermediate_size
    n_lin, n_full = len(config.linear_layers), len(config.full_layers)
    return n_lin * lightning + n_full * softmax + config.num_hidden_layers * moe + 2 * h * config.vocab_size


def deepseek_r1_flops_per_token(context: int, absorbed: bool = False) -> float:
    """DeepSeek-R1 (V3 architecture, published config): 61 layers, hidden 7168, MLA (128 heads, q_lora 1536,
    kv_lora 512, qk 128 nope + 64 rope, v 128), first 3 layers dense (18432), then 256 routed experts top-8
    plus 1 shared (2048 each), vocabulary 129280; the multi-token-prediction module is not counted.
    absorbed: W_UK / W_UV folded into the query and output (attention runs in the 512 + 64 latent space)."""
    h, heads, q_lora, kv_lora, nope, rope, v_dim = 7168, 128, 1536, 512, 128, 64, 128
    proj = 2 * h * q_lora + 2 * q_lora * heads * (nope + rope) + 2 * h * (kv_lora + rope) + 2 * heads * v_dim * h
    if absorbed:
        proj += 2 * heads * nope * kv_lora + 2 * heads * kv_lora * v_dim
        attention = 2 * heads * context * (kv_lora + rope) + 2 * heads * context * kv_lora
    else:
        proj += 2 * kv_lora * heads * (nope + v_dim)   # decompressing the new token's keys and values
        attention = 2 * heads * context * (nope + rope) + 2 * heads * context * v_dim
    dense_ffn = 3 * 6 * h * 18432
    moe_ffn = 58 * (2 * h * 256 + 9 * 6 * h * 2048)
    return 61 * (proj + attention) + dense_ffn + moe_ffn + 2 * h * 129280


def generation_flops(per_token, n: int) -> float:
    """FLOPs to generate n tokens from an empty context: sum of per_token(L) for L = 1..n (affine in L)."""
    base, slope = per_token(0), per_token(1) - per_token(0)
    return n * base + slope * n * (n + 1) / 2


def analytic_models():
    m1 = M1Config.preset("minimax-m1")
    all_softmax = m1.replace(layer_types=[FULL] * m1.num_hidden_layers)
    return {
        "MiniMax-M1 (hybrid)": functools.partial(m1_flops_per_token, m1),
        "M1 all-softmax": functools.partial(m1_flops_per_token, all_softmax),
        "DeepSeek-R1 (MLA standard)": deepseek_r1_flops_per_token,
        "DeepSeek-R1 (MLA absorbed)": functools.partial(deepseek_r1_flops_per_token, absorbed=True),
    }


def analytic_table() -> str:
    models = analytic_models()
    names = list(models)
    lines = ["(a) analytic forward FLOPs (2 per multiply-add)", "",
             f"{'per generated token at context':<32}" + "".join(f"{n:>28}" for n in names)]
    for L in (0,) + GENERATION_LENGTHS:
        lines.append(f"{L:<32}" + "".join(f"{models[n](L) / 1e9:>24.1f} GF " for n in names))
    lines += ["", f"{'total to generate N tokens':<32}" + "".join(f"{n:>28}" for n in names)
              + f"{'M1 / R1 std':>13}{'M1 / R1 abs':>13}"]
    for N in GENERATION_LENGTHS:
        totals = [generation_flops(models[n], N) for n in names]
        lines.append(f"{N:<32}" + "".join(f"{t / 1e15:>24.2f} PF " for t in totals)
                     + f"{totals[0] / totals[2]:>13.2f}{totals[0] / totals[3]:>13.2f}")
    lines += ["", "per-token ratio M1 / R1 (standard MLA) at context 64K: "
              f"{models[names[0]](65536) / models[names[2]](65536):.2f}, at 100K: "
              f"{models[names[0]](100000) / models[names[2]](100000):.2f}"]
    return "\n".join(lines)


def plot_analytic(path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = analytic_models()
    xs = [2 ** i for i in range(10, 19)] + [100000]
    xs = sorted(set(xs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, fn in models.items():
        left.plot(xs, [fn(x) / 1e9 for x in xs], marker="o", ms=3, label=name)
        right.plot(xs, [generation_flops(fn, x) / 1e15 for x in xs], marker="o", ms=3, label=name)
    left.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="GFLOPs per generated token",
             title="FLOPs per token")
    right.set(xscale="log", yscale="log", xlabel="generation length (tokens)", ylabel="PFLOPs in total",
              title="FLOPs to generate N tokens")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------
# (b), (c) Measured: the slice

def _slice_configs(device):
    hybrid = M1Config.preset("minimax-m1-slice" if device.type == "cuda" else "tiny")
    return hybrid, hybrid.replace(layer_types=[FULL] * hybrid.num_hidden_layers)


def _share(ours, source):
    """Point every parameter of `ours` at the parameter of `source` with the same name (no copy)."""
    theirs = dict(source.named_parameters())
    for module_name, module in ours.named_modules():
        for name in list(module._parameters):
            full = f"{module_name}.{name}" if module_name else name
            if full in theirs:
                module._parameters[name] = theirs[full]


def _materialize_rest(model, device, dtype):
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    module._parameters[name] = torch.nn.Parameter(
                        torch.randn(p.shape, device=device, dtype=dtype) * 0.02, requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.to(device)
    return model.eval()


def slice_models(device, with_hf: bool) -> dict:
    """Fresh slice models on `device` (bf16 on a GPU): "hybrid" and either "all_softmax" (softmax attention in
    every layer) or "hf" (the same slice in `transformers`), sharing every weight they have in common.

    Built per case and returned inside the case's inputs, so that the harness frees them with the inputs
    (about 20 GB per model on the GPU) before the next case. `transformers` rotates all 128 head dims
    where M1 rotates 64: the same cost, so the timing comparison holds.
    """
    from m1_kernels.model.modeling import M1ForCausalLM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hybrid_cfg, softmax_cfg = _slice_configs(device)
    torch.manual_seed(0)
    with parameters_on_meta():
        hybrid = M1ForCausalLM(hybrid_cfg)
    if not with_hf:
        _materialize_rest(hybrid, device, dtype)
        with parameters_on_meta():
            all_softmax = M1ForCausalLM(softmax_cfg)
        _share(all_softmax, hybrid)      # embeddings, norms, MoE, LM head and the one softmax layer
        return {"hybrid": hybrid, "all_softmax": _materialize_rest(all_softmax, device, dtype)}
    from transformers import MiniMaxForCausalLM

    from m1_kernels.model.hf import transformers_config
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)            # built in bf16 directly: an fp32 copy of the slice would need 39 GB
    try:
        with torch.device(device):
            hf = MiniMaxForCausalLM(transformers_config(hybrid_cfg, block_size=256)).eval()
    finally:
        torch.set_default_dtype(previous)
    hf.requires_grad_(False)
    _share(hybrid, hf)
    return {"hybrid": _materialize_rest(hybrid, device, dtype), "hf": hf}


def _filled_cache(model, context, batch=1):
    cache = model.new_cache(batch, context + 1)
    with torch.no_grad():
        for s in cache.lightning_states.values():
            s.normal_(0.0, 0.05)
        for t in (*cache.keys.values(), *cache.values.values()):
            t.normal_()
    cache.seq_lens.fill_(context)
    return cache


def _decode_bytes(config, context, elem):
    """Bytes one batch-1 decode step must read: active weights, lightning states (read + write), KV cache."""
    h, H, D, Hkv = config.hidden_size, config.num_attention_heads, config.head_dim, config.num_key_value_heads
    lin_w = 5 * h * H * D
    soft_w = 2 * h * H * D + 2 * h * Hkv * D
    moe_w = h * config.num_local_experts + config.num_experts_per_tok * 3 * h * config.intermediate_size
    n_lin, n_full = len(config.linear_layers), len(config.full_layers)
    weights = (n_lin * lin_w + n_full * soft_w + config.num_hidden_layers * moe_w + h * config.vocab_size) * elem
    return weights + n_lin * H * D * D * 8 + n_full * 2 * context * Hkv * D * elem


def decode_case(device, context):
    hybrid_cfg, softmax_cfg = _slice_configs(device)
    elem = 2 if device.type == "cuda" else 4

    def make():
        models = slice_models(device, with_hf=False)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        caches = {name: _filled_cache(m, context) for name, m in models.items()}
        return {"token": token, "models": models, "caches": caches}

    def step(name):
        def call(inputs):
            cache = inputs["caches"][name]
            cache.seq_lens.fill_(context)          # every call decodes at the same context
            with torch.no_grad():
                return inputs["models"][name](inputs["token"], cache=cache)
        return call

    layers = f"{len(hybrid_cfg.linear_layers)}L+{len(hybrid_cfg.full_layers)}S"
    return Case("model decode vs context", f"slice {layers} decode B1 ctx {context}", make,
                {"ours[hybrid]": step("hybrid"), "ours all-softmax": step("all_softmax")},
                bytes=_decode_bytes(hybrid_cfg, context, elem), flops=m1_flops_per_token(hybrid_cfg, context),
                max_sets=1, params=dict(context=context, softmax_bytes=_decode_bytes(softmax_cfg, context, elem),
                                        softmax_flops=m1_flops_per_token(softmax_cfg, context)))


def prefill_case(device, T):
    hybrid_cfg, _ = _slice_configs(device)

    def make():
        return {"ids": torch.randint(0, hybrid_cfg.vocab_size, (1, T), device=device),
                "models": slice_models(device, with_hf=True)}

    def ours(inputs):
        with torch.no_grad():
            return inputs["models"]["hybrid"](inputs["ids"], last_token_only=True)

    def hf(inputs):
        with torch.no_grad():
            return inputs["models"]["hf"](inputs["ids"], use_cache=False, logits_to_keep=1).logits

    head = 2 * hybrid_cfg.hidden_size * hybrid_cfg.vocab_size            # the LM head runs for the last token only
    attention = len(hybrid_cfg.full_layers) * 2 * hybrid_cfg.num_attention_heads * hybrid_cfg.head_dim * T * T
    flops = T * (m1_flops_per_token(hybrid_cfg, 0) - head) + head + attention   # causal: half of 4 H D T^2
    return Case("model prefill vs transformers", f"slice prefill B1 T{T}", make,
                {"ours": ours, "transformers": hf}, flops=flops, max_sets=1, params=dict(T=T, tokens=T))


def hf_decode_case(device, context):
    """Decode at `context` through each model's own cache: ours (HybridCache) against transformers (MiniMaxCache,
    prefilled once; each timed step appends one token, as in its generation loop)."""
    hybrid_cfg, _ = _slice_configs(device)

    def make():
        from transformers.models.minimax.modeling_minimax import MiniMaxCache
        models = slice_models(device, with_hf=True)
        ids = torch.randint(0, hybrid_cfg.vocab_size, (1, context), device=device)
        hf_cache = MiniMaxCache()
        with torch.no_grad():
            models["hf"](ids, past_key_values=hf_cache, use_cache=True, logits_to_keep=1)
        return {"token": ids[:, -1:], "models": models, "cache": _filled_cache(models["hybrid"], context),
                "hf_cache": hf_cache, "position": torch.full((1, 1), context, device=device)}

    def ours(inputs):
        inputs["cache"].seq_lens.fill_(context)
        with torch.no_grad():
            return inputs["models"]["hybrid"](inputs["token"], cache=inputs["cache"])

    def hf(inputs):
        # position given: transformers would read the past length from layer 0, a lightning layer without keys
        with torch.no_grad():
            return inputs["models"]["hf"](inputs["token"], past_key_values=inputs["hf_cache"], use_cache=True,
                                          position_ids=inputs["position"]).logits

    return Case("model decode vs transformers", f"slice decode B1 ctx {context}", make,
                {"ours": ours, "transformers": hf}, flops=m1_flops_per_token(hybrid_cfg, context), max_sets=1,
                params=dict(context=context, tokens=1))


def cases(device):
    if device.type == "cuda":
        return ([decode_case(device, L) for L in CONTEXTS_GPU]
                + [prefill_case(device, T) for T in (2048, 8192)] + [hf_decode_case(device, 4096)])
    return ([decode_case(device, L) for L in CONTEXTS_CPU] + [prefill_case(device, 128)]
            + [hf_decode_case(device, 64)])


# ------------------------------------------------------------------------------------------------------
# The extra report printed by `python -m m1_kernels.bench`

def report(rows, device, stem) -> list[str]:
    """Print (a) and the measured summaries of (b) and (c); write the plots. Returns the files written."""
    print("\n" + analytic_table())
    written = [p for p in (plot_analytic(stem + "-model_flops.png"),) if p] if stem else []
    decode = [r for r in rows if r["group"] == "model decode vs context" and "median_ms" in r]
    if decode:
        print("\n(b) decode time per token of the slice (batch 1) against context")
        by = {}
        for r in decode:
            by.setdefault(r["params"]["context"], {})[r["impl"]] = r["median_ms"]
        print(f"{'context':>10} {'hybrid ms':>11} {'all-softmax ms':>15} {'all-softmax / hybrid':>22}")
        for L, t in sorted(by.items()):
            h, s = t.get("ours[hybrid]", math.nan), t.get("ours all-softmax", math.nan)
            print(f"{L:>10} {h:>11.3f} {s:>15.3f} {s / h:>22.2f}")
        if stem:
            written += [p for p in (_plot_decode(by, stem + "-model_decode_scaling.png"),) if p]
    speed = [r for r in rows if r["group"].startswith("model ") and "vs transformers" in r["group"] and "median_ms" in r]
    if speed:
        print("\n(c) slice tokens/s, ours against transformers")
        for r in speed:
            tps = r["params"]["tokens"] / (r["median_ms"] * 1e-3)
            vs = ", ".join(f"{s:.2f}x vs {p}" for p, s in r.get("speedup_vs", {}).items())
            print(f"  {r['case']:<48} {r['impl']:<14} {tps:>12.1f} tokens/s  {vs}")
    if device.type != "cuda":
        print("\n(no GPU: (b) and (c) ran the tiny preset on the CPU; they say nothing about GPU speed)")
    return written


def _plot_decode(by, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = sorted(by)
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, label in (("ours[hybrid]", "hybrid (7 lightning + 1 softmax)"), ("ours all-softmax", "all-softmax")):
        ax.plot(xs, [by[x].get(impl, math.nan) for x in xs], marker="o", label=label)
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="ms per decoded token (batch 1)",
           title="M1 slice decode time against context")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
