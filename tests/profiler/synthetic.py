"""Synthetic q/k with planted attention structure, for the profiler's search tests.

Position-dependent scores come from RoPE-like rotations: with q_i = rot(i), k_j = rot(j),
q_i . k_j = sum_f cos(f (i - j)), which peaks at i == j. Low frequencies give a broad
local window; high frequencies only give a sharp peak that block mean-pooling washes
out (as RoPE's fast dimensions do in real models).
"""
import torch

BROAD = torch.tensor([0.5 ** i for i in range(7, 15)])      # 95% of the mass within ~115 tokens
SHARP = torch.tensor([0.5 * 0.75 ** i for i in range(8)])    # a peak a few tokens wide
DIM = 2 * 8


def _rot(pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    ang = pos[:, None].float() * freqs[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1)


def planted_heads(n: int, offsets=(500, 600), columns=tuple(range(100, 500, 16)), seed: int = 0):
    """q (4, n, 16), k (4, n, 16) of four heads: local, vertical lines, slash lines, diffuse."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n)
    q = torch.zeros(4, n, DIM)
    k = torch.zeros(4, n, DIM)
    # 0: local -- a window of ~100 recent tokens
    q[0], k[0] = 2.0 * _rot(pos, BROAD), 2.0 * _rot(pos, BROAD)
    # 1: vertical lines -- the first key and a set of columns score high for every query
    k[1] = 0.1 * torch.randn(n, DIM, generator=g)
    q[1, :, 0] = 4.0
    for c in (0, *columns):
        if c < n:
            k[1, c, 0] = 4.0
    # 2: slash lines -- peaks at j = i - offset for each offset (q sums the shifted rotations)
    q[2] = 1.5 * sum(_rot(pos - o, SHARP) for o in offsets)
    k[2] = 1.5 * _rot(pos, SHARP)
    k[2, 0] = 0.0   # the first key stays reachable for queries before the first offset
    # 3: diffuse -- q = 0: uniform attention
    k[3] = torch.randn(n, DIM, generator=g)
    return q, k
