"""The one RMSNorm of the package (the lightning layer's norm over all heads and the model's norms)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: computed in fp32, cast back to the input dtype, then times the weight
    (the order transformers' MiniMax norms use, so low-precision outputs round as theirs do)."""

    def __init__(self, size, eps, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"
