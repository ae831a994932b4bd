"""The pre-engine static-batch generation loop, kept ONLY as a benchmark baseline (bench/cases_engine.py).

A faithful copy of the repository's generation path before the engine replaced it: the contiguous
slot cache (`HybridCache`, `StepPlan`), the cached forward of the model (packed lightning prefill or
decode per slot; softmax layers writing into [slots, Hkv, max_len, D] and attending with
`F.scaled_dot_product_attention` under a mask) and the static loop (`generate`: all rows prefilled in
one padded call, then one decode step per token for every row until all are done, finished rows kept
decoding). The cached forward is written here as functions over an M1ForCausalLM's modules, so the
baseline runs the same weights as the engine. Nothing else imports this module.
"""

import dataclasses

import torch
import torch.nn.functional as F

from m1_kernels.model.config import M1Config
from m1_kernels.model.modeling import apply_partial_rotary, rotary_cos_sin


@dataclasses.dataclass
class StepPlan:
    """Indices of one forward step, computed once and shared by all layers.

    slot_idx [B] int32, positions [B, T] int64 (absolute position of every token), cu_seqlens [B + 1]
    int32 (valid tokens packed row after row), valid [B, T] bool or None (all valid), key_len (keys a
    softmax layer attends over), attention_mask [B, 1, T, key_len] bool or None, causal_from_zero
    (every row starts empty and is full: plain causal attention), decode (T == 1, every row valid).
    """
    slots: list
    lengths: list
    slot_idx: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    valid: torch.Tensor | None
    valid_rows: torch.Tensor | None
    valid_cols: torch.Tensor | None
    key_len: int
    attention_mask: torch.Tensor | None
    causal_from_zero: bool
    decode: bool
    first_slot: int | None  # slots are first_slot, first_slot + 1, ...: cached keys are read as a view

    def pack(self, h):
        """[B, T, C] -> [1, valid tokens, C], rows one after another."""
        if self.valid is None:
            return h.reshape(1, -1, h.shape[-1])
        return h[self.valid_rows, self.valid_cols][None]

    def unpack(self, packed, shape):
        """Inverse of pack; padding positions get zeros."""
        if self.valid is None:
            return packed.reshape(shape)
        out = packed.new_zeros(shape)
        out[self.valid_rows, self.valid_cols] = packed[0]
        return out


class HybridCache:
    """Per-layer caches of a batch of sequences (see the module docstring).

    Args:
        config: the model's M1Config.
        num_slots: how many sequences it can hold.
        max_len: the most tokens one sequence may reach (sizes the KV caches).
        dtype: dtype of the KV caches (lightning states are always float32).
        device: where the caches live.
    """

    def __init__(self, config: M1Config, num_slots: int, max_len: int, dtype=torch.bfloat16, device=None):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"num_slots and max_len must be positive, got {num_slots}, {max_len}")
        H, D, Hkv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        self.num_slots, self.max_len = num_slots, max_len
        self.lightning_states = {i: torch.zeros(num_slots, H, D, D, dtype=torch.float32, device=device)
                                 for i in config.linear_layers}
        self.keys = {i: torch.zeros(num_slots, Hkv, max_len, D, dtype=dtype, device=device) for i in config.full_layers}
        self.values = {i: torch.zeros_like(k) for i, k in self.keys.items()}
        self.seq_lens = torch.zeros(num_slots, dtype=torch.int64)

    def memory_bytes(self) -> int:
        tensors = [*self.lightning_states.values(), *self.keys.values(), *self.values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self, slots=None):
        """Empty the given slots (default: all)."""
        index = torch.as_tensor(range(self.num_slots) if slots is None else list(slots), dtype=torch.long)
        for state in self.lightning_states.values():
            state[index.to(state.device)] = 0.0
        self.seq_lens[index] = 0

    # ------------------------------------------------------------------------------------------------
    def plan(self, B: int, T: int, slot_idx, lengths, device) -> StepPlan:
        """Validate one step's slots and lengths and build its device-side indices."""
        slots = list(range(B)) if slot_idx is None else [int(s) for s in _host_list("slot_idx", slot_idx)]
        lens = [T] * B if lengths is None else [int(n) for n in _host_list("lengths", lengths)]
        if len(slots) != B or len(lens) != B:
            raise ValueError(f"slot_idx and lengths need one entry per row (B = {B}), got {len(slots)} and {len(lens)}")
        if any(not 0 <= s < self.num_slots for s in slots):
            raise ValueError(f"slot_idx {slots} out of range for a cache of {self.num_slots} slots")
        if len(set(slots)) != B:
            raise ValueError(f"slot_idx {slots} names a slot twice")
        if any(not 0 <= n <= T for n in lens):
            raise ValueError(f"lengths {lens} must lie in [0, T = {T}]")
        starts = [int(self.seq_lens[s]) for s in slots]
        totals = [a + n for a, n in zip(starts, lens)]
        if max(totals) > self.max_len:
            raise ValueError(f"a sequence would reach {max(totals)} tokens; the cache holds at most {self.max_len}")

        slot_idx_d = torch.tensor(slots, dtype=torch.int32, device=device)
        starts_d = torch.tensor(starts, dtype=torch.int64, device=device)
        positions = starts_d[:, None] + torch.arange(T, device=device)[None, :]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        all_valid = all(n == T for n in lens)
        valid = rows = cols = None
        if not all_valid:
            valid = torch.arange(T, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
            rows, cols = valid.nonzero(as_tuple=True)
        key_len = max(totals)
        decode = T == 1 and all_valid
        causal_from_zero = all_valid and all(a == 0 for a in starts)
        mask = None
        if not causal_from_zero and not (decode and len(set(totals)) == 1):
            j = torch.arange(key_len, device=device)
            totals_d = torch.tensor(totals, device=device)
            allowed = (j[None, None, :] <= positions[:, :, None]) & (j[None, None, :] < totals_d[:, None, None])
            allowed[..., 0] = True  # padding queries of an empty row would see no key (NaN); valid ones see key 0 anyway
            mask = allowed[:, None]
        contiguous = slots == list(range(slots[0], slots[0] + B))
        return StepPlan(slots, lens, slot_idx_d, positions, cu_seqlens, valid, rows, cols, key_len, mask,
                        causal_from_zero, decode, slots[0] if contiguous else None)

    def write_kv(self, layer: int, k, v, plan: StepPlan):
        """Store this step's keys/values [B, T, Hkv, D] of `layer`; return the slots' keys and values
        [B, Hkv, key_len, D] (a view when the slots are consecutive)."""
        kc, vc = self.keys[layer], self.values[layer]
        slot = plan.slot_idx.long()
        # The two index tensors around the head slice put their broadcast shape first: [B, T, Hkv, D].
        if plan.valid is None:
            kc[slot[:, None], :, plan.positions] = k.to(kc.dtype)
            vc[slot[:, None], :, plan.positions] = v.to(vc.dtype)
        else:
            r, c = plan.valid_rows, plan.valid_cols
            kc[slot[r], :, plan.positions[r, c]] = k[r, c].to(kc.dtype)
            vc[slot[r], :, plan.positions[r, c]] = v[r, c].to(vc.dtype)
        if plan.first_slot is not None:
            s = plan.first_slot
            return kc[s:s + len(plan.slots), :, :plan.key_len], vc[s:s + len(plan.slots), :, :plan.key_len]
        return kc[slot, :, :plan.key_len], vc[slot, :, :plan.key_len]

    def advance(self, plan: StepPlan):
        """Count the tokens a finished step appended."""
        for s, n in zip(plan.slots, plan.lengths):
            self.seq_lens[s] += n


def _host_list(name, value):
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{name} must be on the host (a list or a CPU tensor): reading it from "
                             f"{value.device} would synchronise every step")
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"{name} must be a list or a CPU tensor, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------------
# The cached forward (the pre-engine M1ForCausalLM.forward / DecoderLayer / SoftmaxAttention cache paths)

def _softmax_attention(attn, x, cos, sin, cache, plan):
    B, T, _ = x.shape
    q = apply_partial_rotary(attn.q_proj(x).view(B, T, attn.num_heads, attn.head_dim), cos, sin)
    k = apply_partial_rotary(attn.k_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim), cos, sin)
    v = attn.v_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim)
    keys, values = cache.write_kv(attn.layer_idx, k, v, plan)        # [B, Hkv, L, D] each
    mask = plan.attention_mask
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                       is_causal=plan.causal_from_zero and mask is None, enable_gqa=True)
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def _lightning(layer, h, cache, plan):
    state = cache.lightning_states[layer.layer_idx]
    if plan.decode:                                       # one token per row: the decode op
        return layer.self_attn(h, state=state, slot_idx=plan.slot_idx)
    packed = plan.pack(h)
    out = layer.self_attn(packed, state=state, slot_idx=plan.slot_idx, cu_seqlens=plan.cu_seqlens)
    return plan.unpack(out, h.shape)


def _layer(layer, x, cos, sin, cache, plan):
    h = layer.input_layernorm(x)
    attn = _lightning(layer, h, cache, plan) if layer.is_linear else \
        _softmax_attention(layer.self_attn, h, cos, sin, cache, plan)
    h = layer.attn_alpha * h + layer.attn_beta * attn
    h = layer.post_attention_layernorm(h)
    return layer.mlp_alpha * h + layer.mlp_beta * layer.mlp(h)


@torch.no_grad()
def cached_forward(model, input_ids, cache, slot_idx=None, lengths=None, last_token_only=False):
    """Logits of input_ids [B, T] continuing the cache (the pre-engine `model(ids, cache=...)`)."""
    B, T = input_ids.shape
    plan = cache.plan(B, T, slot_idx, lengths, input_ids.device)
    x = model.model.embed_tokens(input_ids)
    cos, sin = rotary_cos_sin(plan.positions, model.config.rotary_dim, model.config.rope_theta)
    for layer in model.model.layers:
        x = _layer(layer, x, cos, sin, cache, plan)
    hidden = model.model.norm(x)
    if last_token_only:
        last = torch.full((B,), T - 1, dtype=torch.long) if lengths is None else \
            torch.as_tensor(lengths, dtype=torch.long) - 1
        hidden = hidden[torch.arange(B, device=hidden.device), last.to(hidden.device)]
    cache.advance(plan)
    if model.config.lm_head_fp32:
        return F.linear(hidden.float(), model.lm_head.weight.float())
    return model.lm_head(hidden)


# ------------------------------------------------------------------------------------------------------
# The static loop (the pre-engine model/generate.py)

@dataclasses.dataclass
class GenerationOutput:
    """tokens[b] / logprobs[b]: the new tokens of prompt b and their log-probabilities;
    finish_reasons[b]: "stop" (a stop token), "length" (max_new_tokens) or "repetition"."""
    tokens: list
    logprobs: list
    finish_reasons: list


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next token per row of logits [B, V] (fp32): greedy for temperature 0, else filtered sampling."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, stop_tokens=(),
             repetition_stop=None, generator=None) -> GenerationOutput:
    """Generate continuations of a batch of prompts of any lengths.

    Args:
        model: an M1ForCausalLM.
        prompts: list of token-id lists (at least one token each).
        max_new_tokens: the most tokens generated per prompt.
        temperature, top_k, top_p: sampling (temperature 0 = greedy; top_k 0 and top_p 1 = no filter).
        stop_tokens: ids that end a row (the stop token is returned).
        repetition_stop: (n, p): end a row once its last n tokens each had probability > p.
        generator: torch.Generator for reproducible sampling.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repetition_stop is not None:
        run_len, threshold = repetition_stop
        if run_len < 1 or not 0 <= threshold < 1:
            raise ValueError(f"repetition_stop needs n >= 1 and 0 <= p < 1, got {repetition_stop}")
    device = model.lm_head.weight.device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    cache = HybridCache(model.config, B, max(lengths) + max_new_tokens, dtype=model.lm_head.weight.dtype,
                        device=device)
    ids = torch.zeros(B, max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    logits = cached_forward(model, ids.to(device), cache, lengths=lengths, last_token_only=True)
    tokens, logprobs = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    reasons = ["length"] * B
    ends = [max_new_tokens] * B
    confident_run = torch.zeros(B, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = logits.float()
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None])[:, 0]
        tokens.append(nxt)
        logprobs.append(logp)
        stopped = torch.isin(nxt, stops) & ~done
        repeated = torch.zeros_like(done)
        if repetition_stop is not None:
            confident_run = torch.where(logp.exp() > threshold, confident_run + 1, 0)
            repeated = (confident_run >= run_len) & ~done & ~stopped
        for b, (stop_b, repeat_b) in enumerate(zip(stopped.tolist(), repeated.tolist())):
            if stop_b or repeat_b:
                reasons[b], ends[b] = ("stop" if stop_b else "repetition"), len(tokens)
        done |= stopped | repeated
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        # Finished rows keep decoding (their output is cut below): one batch shape for every step.
        logits = cached_forward(model, nxt[:, None], cache)[:, -1]
    tok = torch.stack(tokens, dim=1).tolist()
    lp = torch.stack(logprobs, dim=1).tolist()
    return GenerationOutput([t[:n] for t, n in zip(tok, ends)], [x[:n] for x, n in zip(lp, ends)], reasons)
