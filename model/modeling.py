"""MiniMax-M1 in one file: embedding, hybrid decoder layers, MoE, final norm, LM head.

Layer i (post-norm DeepNorm, as the released model and `transformers`' MiniMaxDecoderLayer):

    h   = input_layernorm(x)
    h   = alpha_attn * h + beta_attn * attention_i(h)       # the residual is the *normed* input
    h   = post_attention_layernorm(h)
    out = alpha_mlp * h + beta_mlp * moe(h)

attention_i is lightning attention (`lightning_ops.LightningAttention`) on "linear_attention" layers and
softmax attention (GQA, rotate-half RoPE on the first `rotary_dim` dims of each head, causal,
`F.scaled_dot_product_attention`) on "full_attention" layers; moe is `moe_ops.SparseMoE` (top-k of E
SwiGLU experts). The LM head may run in float32 (`config.lm_head_fp32`).

Parameter names are those of `transformers`' MiniMaxForCausalLM (`model.layers.{i}.mlp.experts.gate_up_proj`,
...); model/checkpoint.py also reads and writes the original release's names.

Batches and caches: `forward(input_ids [B, T])` without a cache is the plain causal forward (right
padding never leaks into earlier tokens). With a `HybridCache` (model/cache.py) the layers run on packed
tokens described by a `StepBatch`: lightning layers make one varlen call that starts from, and writes
back, each sequence's fp32 slot state (one token per sequence: the decode op); softmax layers write their
keys/values into the sequence's pages and attend over everything cached so far (paged attention).
`forward(input_ids, cache, slot_idx, lengths)` packs row b's first `lengths[b]` tokens onto slot
`slot_idx[b]`; the engine (model/engine.py) builds its StepBatches itself and calls `M1Model` directly.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from m1_kernels.dispatch import BACKENDS
from m1_kernels.lightning_ops import LightningAttention
from m1_kernels.moe_ops import SparseMoE
from m1_kernels.norm import RMSNorm

from .cache import HybridCache, StepBatch
from .config import LINEAR, M1Config
from .lm_head import lm_head_logits
from .paged_attention import paged_attention_decode, paged_attention_prefill, write_kv


# The model's op families, each of which can take its own kernel backend (M1ForCausalLM's `backend`).
BACKEND_FAMILIES = ("lightning", "moe", "attention")


def family_backends(backend) -> dict:
    """{family: backend name or None} for M1ForCausalLM's `backend`: one name (or None) for every family, or
    a mapping from some of BACKEND_FAMILIES to names; a family left out takes the default dispatch (which
    reads M1_LIGHTNING_BACKEND / M1_MOE_BACKEND / M1_OPS_BACKEND)."""
    if backend is None or isinstance(backend, str):
        chosen = dict.fromkeys(BACKEND_FAMILIES, backend)
    elif isinstance(backend, Mapping):
        unknown = [f for f in backend if f not in BACKEND_FAMILIES]
        if unknown:
            raise ValueError(f"backend: {unknown} are not op families; the model's are {list(BACKEND_FAMILIES)}")
        chosen = {f: backend.get(f) for f in BACKEND_FAMILIES}
    else:
        raise TypeError(f"backend must be a backend name, a mapping from op family to backend name, or None, "
                        f"got {type(backend).__name__}")
    for family, name in chosen.items():
        if name is not None and name not in BACKENDS:
            where = "backend" if isinstance(backend, str) else f"backend[{family!r}]"
            raise ValueError(f"{where} must be one of {list(BACKENDS)} or None, got {name!r}")
    return chosen


def rotary_cos_sin(positions, rotary_dim: int, theta: float):
    """cos, sin [B, T, rotary_dim] (fp32) for integer positions [B, T]; angles in float64 so that
    positions near 10^6 keep their phase."""
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float64) / rotary_dim
    angles = positions.to(torch.float64)[..., None] * theta ** -exponents
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_partial_rotary(x, cos, sin):
    """x [B, T, H, D]: rotate-half RoPE on the first cos.shape[-1] dims of each head, the rest unchanged."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    rot, rest = x[..., :rd].float(), x[..., rd:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([(rot * cos + rotated * sin).to(x.dtype), rest], dim=-1)


class SoftmaxAttention(nn.Module):
    """Causal GQA softmax attention with partial RoPE; keys/values go to the cache when there is one."""

    def __init__(self, config: M1Config, layer_idx: int, backend=None):
        super().__init__()
        self.layer_idx = layer_idx
        # the paged-attention kernels have "triton" and "torch" backends; "cuda" models take their default
        self.backend = backend if backend in ("triton", "torch") else None
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)

    def forward(self, x, cos, sin, cache: HybridCache | None = None, batch: StepBatch | None = None):
        """x [B, T, hidden] without a cache; packed tokens [1, T, hidden] with one (cos/sin alike)."""
        B, T, _ = x.shape
        q = apply_partial_rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_partial_rotary(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if cache is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))  # B may be 0
        k_pages, v_pages = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        write_kv(k[0], v[0], k_pages, v_pages, batch.slot_mapping, backend=self.backend)
        scale = self.head_dim ** -0.5
        if batch.decode:
            o = paged_attention_decode(q[0], k_pages, v_pages, batch.block_table, batch.seq_lens, scale,
                                       backend=self.backend)
        else:
            o = paged_attention_prefill(q[0], k_pages, v_pages, batch.block_table, batch.cu_seqlens, batch.seq_lens,
                                        scale, backend=self.backend)
        return self.o_proj(o.reshape(B, T, -1))


class DecoderLayer(nn.Module):
    """One hybrid layer: lightning or softmax attention, then MoE, both with post-norm DeepNorm residuals."""

    def __init__(self, config: M1Config, layer_idx: int, backend=None):
        super().__init__()
        backend = family_backends(backend)
        self.layer_idx = layer_idx
        self.is_linear = config.layer_types[layer_idx] == LINEAR
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_linear:
            self.self_attn = LightningAttention(config.hidden_size, config.num_attention_heads, config.head_dim,
                                                layer_idx, config.num_hidden_layers,
                                                norm_eps=config.lightning_norm_eps, backend=backend["lightning"])
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha, config.linear_attn_beta
        else:
            self.self_attn = SoftmaxAttention(config, layer_idx, backend["attention"])
            self.attn_alpha, self.attn_beta = config.full_attn_alpha, config.full_attn_beta
        self.mlp = SparseMoE(config.hidden_size, config.intermediate_size, config.num_local_experts,
                             config.num_experts_per_tok, backend=backend["moe"])
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha, config.mlp_beta

    def _lightning(self, h, cache, batch):
        if cache is None:
            return self.self_attn(h)
        state = cache.lightning_states[self.layer_idx]
        if batch.decode:                                      # one token per sequence: the decode op
            return self.self_attn(h.transpose(0, 1), state=state, slot_idx=batch.slot_idx).transpose(0, 1)
        # Prefill that continues each slot: the packed tokens of all sequences in one varlen call.
        return self.self_attn(h, state=state, slot_idx=batch.slot_idx, cu_seqlens=batch.cu_seqlens)

    def forward(self, x, cos, sin, cache=None, batch=None):
        h = self.input_layernorm(x)
        attn = self._lightning(h, cache, batch) if self.is_linear else self.self_attn(h, cos, sin, cache, batch)
        h = self.attn_alpha * h + self.attn_beta * attn
        h = self.post_attention_layernorm(h)
        return self.mlp_alpha * h + self.mlp_beta * self.mlp(h)


class M1Model(nn.Module):
    """Embedding, decoder layers, final norm (the `model.` prefix of the checkpoint names)."""

    def __init__(self, config: M1Config, backend=None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cache=None, batch=None, positions=None):
        """Final hidden states: of input_ids [B, T] without a cache, of the packed tokens [T] of a StepBatch
        (shape [T, hidden]) with one. positions: [B, T] RoPE positions of an uncached forward (default
        0..T-1; a context-parallel rank passes its chunk's global positions)."""
        if cache is not None:
            input_ids, positions = input_ids[None], batch.positions[None]
        elif positions is None:
            B, T = input_ids.shape
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, batch)
        x = self.norm(x)
        return x[0] if cache is not None else x


class M1ForCausalLM(nn.Module):
    """MiniMax-M1 causal LM.

    Args:
        config: the architecture (see M1Config; `M1Config.preset("minimax-m1")` is the released model).
        backend: kernel backend of the model's ops: "cuda", "triton", "torch" or None (the default of
            m1_kernels.dispatch) for all of them, or a mapping from op family ("lightning", "moe",
            "attention": the softmax layers' paged attention) to one of those, e.g. {"moe": "cuda"} to train
            the MoE layers on the CUTLASS GEMMs while lightning attention keeps its default. The softmax
            layers' kernels have "triton" and "torch" backends; "cuda" leaves them their default.
    """

    def __init__(self, config: M1Config, backend=None):
        super().__init__()
        self.config = config
        self.model = M1Model(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02):
        """Random init (normal(0, std) for matrices, ones for norm weights); a no-op on the meta device."""
        for p in self.parameters():
            if p.is_meta:
                continue
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def _check_input_ids(self, input_ids, decode_step: bool):
        """Type, shape and range of forward's input_ids. The range check reads the ids on the host: free
        for CPU tensors; for GPU ones one synchronisation per forward, so it is skipped on one-token cached
        steps (decode: the generation loop feeds back ids it sampled from the vocabulary), during CUDA graph
        capture and under torch.compile, where the embedding's device-side assert is the guard left."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor [B, T] of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be [B, T] with B, T >= 1, got shape {tuple(input_ids.shape)}")
        device = input_ids.device.type
        if device == "meta" or torch.compiler.is_compiling():
            return
        if device == "cuda" and (decode_step or torch.cuda.is_current_stream_capturing()):
            return
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size = {self.config.vocab_size}), "
                             f"got values in [{lo}, {hi}]")

    def forward(self, input_ids, cache: HybridCache | None = None, slot_idx=None, lengths=None,
                last_token_only: bool = False):
        """Logits of a batch of token ids.

        Args:
            input_ids: [B, T] int64 (or int32) ids in [0, vocab_size), B, T >= 1, right-padded when rows
                have different lengths. Positions (the cached length plus T) may not pass the config's
                max_position_embeddings. The id range is read on the host (see _check_input_ids).
            cache: a HybridCache to continue from and to append to (None: a plain full forward). A cached
                step is inference and runs without autograd.
            slot_idx: cache slot of each row ([B] ints, host list or CPU tensor; default 0..B-1).
            lengths: valid tokens of each row ([B] ints on the host; default T). Padding past a row's
                length is never cached, and its logits are meaningless.
            last_token_only: return the logits of each row's last valid token only.

        Returns:
            logits [B, T, vocab] (or [B, vocab] with last_token_only); float32 when config.lm_head_fp32,
            else the model's dtype.
        """
        self._check_input_ids(input_ids, decode_step=cache is not None and input_ids.shape[-1:] == (1,))
        B, T = input_ids.shape
        if cache is not None:
            batch, rows, cols, positions = cache.plan(B, T, slot_idx, lengths, input_ids.device)
        elif slot_idx is not None:
            raise ValueError("slot_idx needs a cache")
        else:
            positions = T                                     # one past the last position of this step
        if positions > self.config.max_position_embeddings:
            raise ValueError(f"input_ids reach position {positions - 1} (cached tokens plus T = {T}), past the "
                             f"config's max_position_embeddings = {self.config.max_position_embeddings}")
        last = None
        if last_token_only:
            last = torch.full((B,), T - 1, dtype=torch.long) if lengths is None else \
                torch.as_tensor(lengths, dtype=torch.long) - 1
            if (last < 0).any():
                raise ValueError("last_token_only needs at least one token in every row")
        if cache is None:
            hidden = self.model(input_ids)
            if last is not None:
                hidden = hidden[torch.arange(B, device=hidden.device), last.to(hidden.device)]
            return self._logits(hidden)
        # A cached step is inference (the cache is written in place): it never records autograd. The
        # layers see the valid tokens packed ([N] ids); logits go back to the [B, T] grid.
        with torch.no_grad():
            hidden = self.model(input_ids[rows, cols], cache, batch)
            cache.advance()
            if last is not None:                              # each row's last token is its last packed one
                return self._logits(hidden[torch.cumsum(last.to(hidden.device) + 1, 0) - 1])
            packed = self._logits(hidden)
            logits = packed.new_zeros(B, T, packed.shape[-1])
            logits[rows, cols] = packed
            return logits

    def _logits(self, hidden):
        if self.config.lm_head_fp32:      # fp32-accurate from the 16-bit weight, without an fp32 copy of it
            return lm_head_logits(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight).view(
                *hidden.shape[:-1], -1)
        return self.lm_head(hidden)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def cast_parameters(self, dtype) -> "M1ForCausalLM":
        """Cast the parameters only: buffers (fp32 decay rates of the lightning layers) keep their dtype.
        dtype: a torch dtype or its name ("bfloat16", ...)."""
        from .checkpoint import parse_dtype
        dtype = parse_dtype(dtype)
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    def new_cache(self, num_slots: int, max_len: int, page_size: int = 16) -> HybridCache:
        """An empty HybridCache for forward(ids, cache=...): `num_slots` sequences of up to `max_len` tokens,
        each slot owning its pages (the engine sizes and shares pages itself)."""
        w = self.lm_head.weight
        return HybridCache.with_slot_pages(self.config, num_slots, max_len, page_size, dtype=w.dtype, device=w.device)

    def parameter_counts(self) -> dict:
        """{"total", "non_embedding", "active"}: all parameters; without embeddings and LM head; and those
        one token uses (each MoE layer's router and top_k of its experts, no embeddings or LM head)."""
        share = self.config.num_experts_per_tok / self.config.num_local_experts
        total = non_embedding = active = 0
        seen = set()
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if name.startswith(("model.embed_tokens.", "lm_head.")):
                continue
            non_embedding += p.numel()
            active += p.numel() * share if ".mlp.experts." in name else p.numel()
        return {"total": total, "non_embedding": non_embedding, "active": int(round(active))}

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, backend=None) -> "M1ForCausalLM":
        """Load a local safetensors checkpoint folder (single file or sharded, either naming scheme).

        dtype: a torch dtype or its name as `transformers` takes it ("bfloat16", "float32", ...); None or
        "auto": the config's torch_dtype, else the stored weights' dtype. device: where the parameters go.
        backend: the kernel backend of the model's ops, one or one per op family (as in M1ForCausalLM)."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device, backend=backend)

    def save_pretrained(self, path, max_shard_bytes: int = 5 << 30, names: str = "original"):
        """Write config.json and safetensors shards of at most max_shard_bytes, in the original release's names
        (names="original") or `transformers`' (names="transformers"); earlier weight files in `path` go."""
        from .checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, names=names)

    def generate(self, prompts, sampling_params=None, **engine_kwargs) -> list:
        """Generate with a one-off Engine sized for these prompts (no CUDA graphs, no prefix cache unless
        asked): one RequestOutput per prompt (model/engine.py). For repeated calls, build an Engine once.

        Args:
            prompts: a list of token-id lists.
            sampling_params: a SamplingParams, one per prompt, or None (the defaults).
            engine_kwargs: Engine arguments overriding the sizes chosen here.
        """
        from .engine import Engine
        from .sampling import SamplingParams
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(prompts, (list, tuple)):     # size the engine; Engine.generate checks the inputs
            listed = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
            sizes = [(len(p), q.n, q.max_tokens) for p, q in zip(prompts, listed)
                     if isinstance(p, (list, tuple)) and isinstance(q, SamplingParams)]
            page = 16
            engine_kwargs = dict(
                max_num_seqs=max(1, min(256, sum(n for _, n, _ in sizes))), page_size=page,
                max_model_len=min(self.config.max_position_embeddings, max((L + m for L, _, m in sizes), default=2)),
                num_pages=max(1, sum(-(-L // page) + n * -(-(L % page + m) // page) for L, n, m in sizes)),
                cuda_graphs=False, enable_prefix_caching=False) | engine_kwargs
        return Engine(self, **engine_kwargs).generate(prompts, params)
