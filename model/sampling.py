"""Sampling parameters and the engine's sampler: seeded draws that do not depend on batch composition.

A draw is a Gumbel-max race: token = argmax_v(logit_v / temperature + g_v) with g_v = -log(-log u_v),
which picks v with probability softmax(logit / temperature)_v. The uniforms u_v come from a
counter-based integer hash of (row key, v) computed on the device, where the row key hashes (seed,
prompt, occurrence of that prompt in the call, sample index, position). No generator state: a draw is
the same whatever else is batched, whichever slot or row it lands in, inside or outside a CUDA graph.

Temperature 0 is greedy (argmax of the raw logits, the lowest id on ties). Top-k and top-p become one
threshold per row on the temperature-scaled logits (computed only when some row asks for it: a sort of
200K logits per row is expensive); tokens below it are out of the race (ties at the threshold stay in).
The log-probability returned with a token is log_softmax of the raw fp32 logits (the model's own
distribution, before temperature, top-k and top-p): what an RL trainer compares its policy against.

Two implementations of the sampler with the same hash: a Triton kernel (one pass over each row's
logits: race, argmax and log-sum-exp together) and plain torch (CPU and the "torch" backend).
"""

import dataclasses
import hashlib
import math
import numbers

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B   # lowbias32 (C. Wellons): a full-avalanche 32-bit mixer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample the completions of one prompt (vLLM's names).

    n: completions per prompt; they share the prompt's prefill.
    temperature: 0 = greedy; otherwise logits are divided by it before the draw.
    top_p: keep the smallest set of most likely tokens holding top_p of the (tempered) mass; 1 = off.
    top_k: keep the k most likely tokens; 0 = off.
    max_tokens: the most tokens generated per completion.
    stop_token_ids: ids that end a completion (the stop token is part of the output: finish "stop").
    repetition_stop: (n, p): end a completion once its last n tokens each had probability above p under
        the model (finish "repetition"; the M1 report cuts degenerate repetition at (3000, 0.99)).
    seed: completions with the same seed, prompt and sample index draw the same tokens (None: a fresh
        seed from torch's default generator, so torch.manual_seed makes a run reproducible).
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: tuple = ()
    repetition_stop: tuple | None = None
    seed: int | None = None

    def __post_init__(self):
        for name, lo in (("n", 1), ("top_k", 0), ("max_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"SamplingParams.{name} must be an int, got {type(value).__name__}")
            if value < lo:
                raise ValueError(f"SamplingParams.{name} must be >= {lo}, got {value}")
            object.__setattr__(self, name, int(value))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"SamplingParams.{name} must be a number, got {type(value).__name__}")
            object.__setattr__(self, name, float(value))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must lie in (0, 1], got {self.top_p}")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes, torch.Tensor)) or not hasattr(stops, "__iter__"):
            raise TypeError(f"SamplingParams.stop_token_ids must be a list or tuple of ints, got {type(stops).__name__}")
        stops = tuple(stops)
        if any(not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 0 for t in stops):
            raise ValueError(f"SamplingParams.stop_token_ids must hold non-negative ints, got {stops}")
        object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(int(t) for t in stops)))
        if self.repetition_stop is not None:
            rep = self.repetition_stop
            if not isinstance(rep, (tuple, list)) or len(rep) != 2:
                raise TypeError(f"SamplingParams.repetition_stop must be None or a pair (n, p), got {rep!r}")
            count, p = rep
            if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 1:
                raise ValueError(f"SamplingParams.repetition_stop needs an int n >= 1, got {count!r}")
            if not isinstance(p, numbers.Real) or not 0 <= p < 1:
                raise ValueError(f"SamplingParams.repetition_stop needs 0 <= p < 1, got {p!r}")
            object.__setattr__(self, "repetition_stop", (int(count), float(p)))
        if self.seed is not None:
            if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
                raise TypeError(f"SamplingParams.seed must be None or an int, got {type(self.seed).__name__}")
            if not 0 <= self.seed < 2 ** 64:
                raise ValueError(f"SamplingParams.seed must lie in [0, 2**64), got {self.seed}")
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p cut the distribution (a greedy draw ignores both)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)


# ----------------------------------------------------------------------------------------------------
# Keys: host side (Python ints / numpy), once per completion and per step

def mix32(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * _MUL1) & MASK32
    x ^= x >> 15
    x = (x * _MUL2) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, prompt, occurrence: int, sample: int) -> int:
    """The 32-bit key of one completion: seed, the prompt's tokens, which occurrence of that prompt in the
    call it is (identical prompts of one call draw differently), and the sample index."""
    digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), digest_size=8).digest()
    key = 0
    for word in (seed & MASK32, seed >> 32, int.from_bytes(digest[:4], "little"),
                 int.from_bytes(digest[4:], "little"), occurrence, sample):
        key = mix32(key ^ mix32(word))
    return key


def _mix32_np(x):
    x = x & MASK32
    x ^= x >> 16
    x = (x * _MUL1) & MASK32
    x ^= x >> 15
    x = (x * _MUL2) & MASK32
    return x ^ (x >> 16)


def row_keys(stream_keys, positions) -> np.ndarray:
    """Per-row keys of one step: a completion's stream key and the position of the token being drawn."""
    keys = np.asarray(stream_keys, dtype=np.uint64)
    return _mix32_np(keys ^ _mix32_np(np.asarray(positions, dtype=np.uint64))).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Device side: the uniforms, the thresholds, the sampler

def _mul32(x, c: int):
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow."""
    hi, lo = c >> 16, c & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _mix32_torch(x):
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def gumbel_noise(keys, vocab_size: int):
    """g [R, V] fp32 for row keys [R] (int64 holding uint32): -log(-log u), u = hash(key, v) in (0, 1)."""
    v = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)[None, :]
    k = keys.long()[:, None]
    bits = _mix32_torch((_mix32_torch(v ^ k) + k) & MASK32)
    u = ((bits >> 8).float() + 0.5) * 2.0 ** -24
    return -torch.log(-torch.log(u))


def filter_thresholds(logits, rows, inv_temp, top_k, top_p, kmax: int, any_top_p: bool):
    """Per-row lowest tempered logit that stays in the race after top-k then top-p ([R] fp32; -inf: no
    cut). logits [*, V] fp32, rows [R] int64 (row r reads logits[rows[r]]), inv_temp [R] (0: greedy,
    no cut), top_k [R] int64 (0: off), top_p [R] fp32 (1: off); kmax = max(top_k) and any_top_p come
    from the host (reading them here would synchronise)."""
    scaled = logits[rows] * inv_temp[:, None]
    floor = torch.full_like(inv_temp, float("-inf"))
    use_k = (top_k > 0) & (inv_temp > 0)
    use_p = (top_p < 1) & (inv_temp > 0)
    if kmax:
        kth = torch.topk(scaled, min(kmax, scaled.shape[-1]), dim=-1).values
        kth = kth.gather(1, (top_k.clamp(1, kth.shape[-1]) - 1)[:, None])[:, 0]
        floor = torch.where(use_k, kth, floor)
    if any_top_p:
        masked = scaled.masked_fill(scaled < floor[:, None], float("-inf"))
        ordered = masked.sort(dim=-1, descending=True).values
        probs = torch.softmax(ordered, dim=-1)
        # keep a token while the tokens ranked above it hold less than top_p (the first always stays)
        keep = (probs.cumsum(-1) - probs) < top_p[:, None]
        last = keep.sum(-1).clamp(min=1) - 1
        floor = torch.where(use_p, torch.maximum(floor, ordered.gather(1, last[:, None])[:, 0]), floor)
    return floor


def sample_torch(logits, rows, inv_temp, floor, keys):
    """tokens [R] int64 and their log-probabilities [R] fp32 (see the module docstring)."""
    x = logits[rows].float()
    scaled = x * inv_temp[:, None]
    race = torch.where(scaled >= floor[:, None], scaled + gumbel_noise(keys, x.shape[-1]), float("-inf"))
    score = torch.where(inv_temp[:, None] > 0, race, x)
    tokens = score.argmax(dim=-1)
    logprobs = torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


def sample(logits, rows, inv_temp, floor, keys, backend: str):
    """Draw one token per row; backend "triton" (one fused pass) or "torch"."""
    if backend == "torch":
        return sample_torch(logits, rows, inv_temp, floor, keys)
    from .sampling_triton import sample_triton
    return sample_triton(logits, rows, inv_temp, floor, keys)


def finish_codes(tokens, logprobs, stop_ids, rep_count, rep_prob, runs, slots, first):
    """Device-side stop checks of one step's draws: 1 = stop token, 2 = repetition, 0 = go on.

    stop_ids [R, S] (-1 pads), rep_count [R] (0: off), rep_prob [R]; runs [slots] int32 counts each
    slot's trailing tokens drawn with probability above its threshold (updated in place; `first` rows
    start a new completion in their slot).
    """
    stop = (tokens[:, None] == stop_ids).any(dim=-1)
    previous = torch.where(first, 0, runs[slots])
    run = torch.where(logprobs.exp() > rep_prob, previous + 1, 0).to(runs.dtype)
    runs[slots] = run
    repeated = (rep_count > 0) & (run >= rep_count)
    return torch.where(stop, 1, torch.where(repeated, 2, 0))
