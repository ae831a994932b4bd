"""Hybrid cache of MiniMax-M1: an fp32 lightning state per linear layer, a KV cache per softmax layer.

Slots hold sequences. Lightning layers keep one state `[slots, H, D, D]` in float32 (the state of the
last layers barely decays and keeps growing: bf16 would lose it); softmax layers keep keys and values
`[slots, Hkv, max_len, D]` in the model's dtype (head-major: each head's keys are contiguous, the
layout attention kernels read). `seq_lens` (on the host: the generation loop knows
every length without asking the device) counts the tokens each slot holds.

A forward step over rows b = 0..B-1 appends the first `lengths[b]` tokens of row b to slot
`slot_idx[b]`; `plan()` turns that into device index tensors once per step, shared by every layer.
"""

import dataclasses

import torch

from .config import M1Config


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
