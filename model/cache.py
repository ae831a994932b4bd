"""Hybrid cache of MiniMax-M1: fp32 lightning states in slots, softmax-layer keys/values in pages.

Lightning layers keep one state per slot, `lightning_states[layer]` of shape `[slots, H, D, D]` in
float32 (the state of the last layers barely decays and keeps growing: bf16 would lose it). Softmax
layers keep keys and values in fixed-size pages, `keys[layer]` / `values[layer]` of shape
`[num_pages, Hkv, page_size, D]` in the model's dtype; `block_tables[slot]` lists the pages of the
sequence in that slot (token t of the sequence lives in page `block_tables[slot, t // page_size]` at
offset `t % page_size`). Pages can be shared by several slots (the samples of one prompt, prefixes
found in the prefix cache); who owns which page is the engine's bookkeeping (model/scheduler.py).

Two users:
- the engine (model/engine.py) allocates pages itself and builds one `StepBatch` per forward;
- `M1ForCausalLM.forward(ids, cache=...)` with a cache from `M1ForCausalLM.new_cache(num_slots, max_len)`:
  every slot owns a fixed run of pages and `seq_lens` (on the host) counts its tokens; `plan()` turns one
  call's (slot_idx, lengths) into a StepBatch.

Forward steps run on packed tokens: the valid tokens of all sequences of a step, one after another.
"""

import dataclasses
import math

import torch

from .config import M1Config


@dataclasses.dataclass
class StepBatch:
    """Device-side indices of one forward step over packed tokens, shared by every layer.

    positions [T] int64: position of each packed token in its sequence.
    cu_seqlens [N + 1] int32: sequence n owns packed tokens cu_seqlens[n] .. cu_seqlens[n + 1] - 1.
    slot_idx [N] int32: the slot of each sequence (lightning state and block table); negative = padding
        (no state change, no cache write, output ignored).
    seq_lens [N] int32: tokens of each sequence in the cache once this step's are written.
    block_table [N, max_pages] int32: the pages of each sequence.
    slot_mapping [T] int64: where each packed token's key/value goes (page * page_size + offset; -1: nowhere).
    decode: every sequence has exactly one token (the decode kernels run).
    """
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    slot_idx: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    decode: bool


class HybridCache:
    """Lightning slots and KV pages of one model (see the module docstring).

    Args:
        config: the model's M1Config.
        num_slots: how many sequences it holds at once (lightning states).
        num_pages: KV pages per softmax layer.
        page_size: tokens per page.
        max_pages_per_seq: width of the block tables (max sequence length / page_size, rounded up).
        dtype: dtype of the keys/values (lightning states are always float32).
        device: where everything lives.
        num_snapshots: extra lightning states for the engine's prefix cache (snapshots at block boundaries).
    """

    def __init__(self, config: M1Config, num_slots: int, num_pages: int, page_size: int, max_pages_per_seq: int,
                 dtype=torch.bfloat16, device=None, num_snapshots: int = 0):
        for name, value in (("num_slots", num_slots), ("num_pages", num_pages), ("page_size", page_size),
                            ("max_pages_per_seq", max_pages_per_seq)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        H, D, Hkv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        self.config = config
        self.num_slots, self.num_pages, self.page_size = num_slots, num_pages, page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.lightning_states = {i: torch.zeros(num_slots, H, D, D, dtype=torch.float32, device=device)
                                 for i in config.linear_layers}
        self.snapshots = {i: torch.zeros(num_snapshots, H, D, D, dtype=torch.float32, device=device)
                          for i in config.linear_layers}
        self.keys = {i: torch.zeros(num_pages, Hkv, page_size, D, dtype=dtype, device=device)
                     for i in config.full_layers}
        self.values = {i: torch.zeros_like(k) for i, k in self.keys.items()}
        self.block_tables = torch.zeros(num_slots, max_pages_per_seq, dtype=torch.int32, device=device)
        # plan() only (slot-owned pages): tokens per slot, on the host, and the most a slot may hold.
        self.seq_lens = torch.zeros(num_slots, dtype=torch.int64)
        self.max_len = None

    @staticmethod
    def bytes_per_slot(config: M1Config) -> int:
        """Bytes of one lightning slot (or snapshot): every linear layer's fp32 state."""
        return len(config.linear_layers) * config.num_attention_heads * config.head_dim ** 2 * 4

    @staticmethod
    def bytes_per_page(config: M1Config, page_size: int, dtype) -> int:
        """Bytes of one page in every softmax layer (keys and values)."""
        elem = torch.empty(0, dtype=dtype).element_size()
        return len(config.full_layers) * 2 * config.num_key_value_heads * page_size * config.head_dim * elem

    @classmethod
    def with_slot_pages(cls, config: M1Config, num_slots: int, max_len: int, page_size: int = 16,
                        dtype=torch.bfloat16, device=None) -> "HybridCache":
        """A cache in which slot s owns pages s * P .. s * P + P - 1 (P = max_len / page_size rounded up),
        for `M1ForCausalLM.forward(ids, cache=...)`."""
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        per_slot = math.ceil(max_len / page_size)
        cache = cls(config, num_slots, num_slots * per_slot, page_size, per_slot, dtype=dtype, device=device)
        cache.max_len = max_len
        cache.block_tables.copy_(torch.arange(num_slots * per_slot, dtype=torch.int32).view(num_slots, per_slot))
        return cache

    def memory_bytes(self) -> int:
        tensors = [*self.lightning_states.values(), *self.snapshots.values(), *self.keys.values(),
                   *self.values.values(), self.block_tables]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------------------------------------
    # Device-side building blocks (no host synchronisation: usable inside CUDA graphs)

    def batch(self, positions, token_slots, cu_seqlens, slot_idx, seq_lens, decode: bool) -> StepBatch:
        """A StepBatch from device tensors: positions [T] int64, token_slots [T] (the slot of each packed
        token, negative = padding), cu_seqlens [N + 1], slot_idx [N] and seq_lens [N] (any int dtype)."""
        P = self.page_size
        slot_idx = slot_idx.to(torch.int32)
        block_table = self.block_tables[slot_idx.clamp(min=0).long()]
        token_slots = token_slots.long()
        page = self.block_tables[token_slots.clamp(min=0), positions // P].long()
        slot_mapping = torch.where(token_slots >= 0, page * P + positions % P, -1)
        return StepBatch(positions, cu_seqlens.to(torch.int32), slot_idx, seq_lens.to(torch.int32), block_table,
                         slot_mapping, decode)

    def decode_batch(self, positions, slot_idx) -> StepBatch:
        """One token per row: row b is the token at `positions[b]` of the sequence in slot `slot_idx[b]`."""
        B = positions.shape[0]
        cu = torch.arange(B + 1, dtype=torch.int32, device=positions.device)
        seq_lens = torch.where(slot_idx >= 0, positions + 1, 0)       # padding rows read nothing
        return self.batch(positions, slot_idx, cu, slot_idx, seq_lens, decode=True)

    def zero_slots(self, slots):
        """Empty the lightning states of `slots` (a device int64 tensor)."""
        for state in self.lightning_states.values():
            state.index_fill_(0, slots, 0.0)

    def copy_slots(self, src, dst):
        """Lightning states of slots `src` into slots `dst` (device int64 tensors of one length)."""
        for state in self.lightning_states.values():
            state.index_copy_(0, dst, state.index_select(0, src))

    def save_snapshots(self, slots, snaps):
        for layer, state in self.lightning_states.items():
            self.snapshots[layer].index_copy_(0, snaps, state.index_select(0, slots))

    def load_snapshots(self, snaps, slots):
        for layer, state in self.lightning_states.items():
            state.index_copy_(0, slots, self.snapshots[layer].index_select(0, snaps))

    def copy_pages(self, src, dst):
        """Keys/values of pages `src` into pages `dst` (device int64 tensors), every softmax layer."""
        for pages in (*self.keys.values(), *self.values.values()):
            pages.index_copy_(0, dst, pages.index_select(0, src))

    # ------------------------------------------------------------------------------------------------
    # The slot-owned use of forward(ids, cache=...)

    def reset(self, slots=None):
        """Empty the given slots (default: all)."""
        index = torch.as_tensor(range(self.num_slots) if slots is None else list(slots), dtype=torch.long)
        self.zero_slots(index.to(self.block_tables.device))
        self.seq_lens[index] = 0

    def plan(self, B: int, T: int, slot_idx, lengths, device):
        """Validate one forward call's rows (row b appends its first lengths[b] tokens to slot slot_idx[b])
        and build its StepBatch. Returns (batch, rows, cols, end): packed token i is input_ids[rows[i], cols[i]];
        end is one past the last position the step reaches."""
        if self.max_len is None:
            raise ValueError("forward(cache=...) needs a cache from M1ForCausalLM.new_cache (slot-owned pages); "
                             "an engine's cache is driven by the engine")
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
        keep = [b for b in range(B) if lens[b] > 0]           # rows without tokens take no part
        rows = [b for b in keep for _ in range(lens[b])]
        cols = [c for b in keep for c in range(lens[b])]
        positions = [starts[b] + c for b, c in zip(rows, cols)]
        cu = [0]
        for b in keep:
            cu.append(cu[-1] + lens[b])
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        token_slots = as_tensor([slots[b] for b in rows])
        decode = all(lens[b] == 1 for b in keep)
        batch = self.batch(as_tensor(positions), token_slots, as_tensor(cu), as_tensor([slots[b] for b in keep]),
                           as_tensor([totals[b] for b in keep]), decode)
        self._pending = [(slots[b], lens[b]) for b in keep]
        return batch, as_tensor(rows), as_tensor(cols), max(totals)

    def advance(self):
        """Count the tokens the step planned last appended."""
        for s, n in self._pending:
            self.seq_lens[s] += n
        self._pending = []


def _host_list(name, value):
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{name} must be on the host (a list or a CPU tensor): reading it from "
                             f"{value.device} would synchronise every step")
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"{name} must be a list or a CPU tensor, got {type(value).__name__}")
