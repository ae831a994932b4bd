"""MiniMax per-head decay rates."""

import torch


def _alibi(n: int) -> list[float]:
    # ALiBi: a geometric sequence for a power of two; otherwise the nearest power of two plus every
    # other slope of the next one.
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    lower = 1 << (n.bit_length() - 1)
    return _alibi(lower) + _alibi(2 * lower)[0::2][: n - lower]


def slopes(num_heads: int, layer_idx: int, num_layers: int, device=None) -> torch.Tensor:
    """Decay rates s_h [H] fp32 of linear layer `layer_idx` (counted over all `num_layers` layers):
    ALiBi slopes times (1 - layer_idx / (num_layers - 1) + 1e-5), as in the MiniMax-M1 release."""
    if num_heads < 1 or num_layers < 2 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"need num_heads >= 1, num_layers >= 2, 0 <= layer_idx < num_layers; got "
                         f"{num_heads}, {layer_idx}, {num_layers}")
    factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5
    rates = torch.tensor(_alibi(num_heads), dtype=torch.float64) * factor
    return rates.to(device=device, dtype=torch.float32)
