"""Rate-distortion assignment: each weight goes to the level that minimises its squared error plus
λ times the bits its level costs, instead of to the nearest level.

    cost_k(w) = (w - c_k)^2 + λ·σ²·rate_k

Entropy-constrained scalar quantization (Chou, Lookabaugh, Gray, "Entropy-constrained vector
quantization", IEEE Trans. ASSP 37(1), 1989): ``rate_k`` is the code length of level k under the
coder's model. The .cpz codes each tensor's level symbols with one Huffman table, so the model here
is the empirical entropy of the level frequencies, -log2(n_k / n) (``entropy_rates``): assign,
recount, reassign, a few rounds. A rate model is any function from level counts to bits per level,
so another coder's model (a context-adaptive one) can take its place.

λ is scale-free: it multiplies σ², the variance of the layer's nonzero weights, so ``λ`` is the
share of the layer's variance that one bit per weight is worth, and one λ serves every layer. For a
Gaussian layer D(R) = σ²·2^(-2R), whose slope is 2 ln 2·σ²·2^(-2R): at 4 bits about 0.005σ², at 3
bits 0.02σ², at 2 bits 0.09σ²; from about 1.4 (the slope at R = 0) the best trade is one level for
the whole layer. ``MAX_RD_LAMBDA`` bounds it.

In one dimension the cost is, per level, a line in w plus w² (w² - 2c_k·w + c_k² + μ·rate_k), so the
best level is the lower envelope of K lines: intervals of w, found once per round in O(K) and then
looked up by a binary search per weight (``rd_assign``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

MAX_RD_LAMBDA = 10.0
RD_ROUNDS = 10  # assign -> recount -> reassign rounds at most (they settle in a few)

RateModel = Callable[[torch.Tensor], torch.Tensor]  # level counts (K,) -> bits per level (K,), inf: unusable


def entropy_rates(counts: torch.Tensor) -> torch.Tensor:
    """-log2 of each level's frequency (float64); a level no weight uses costs infinitely many bits
    (ECVQ drops it: an empty cell stays empty)."""
    c = counts.double()
    total = float(c.sum())
    if total <= 0:
        return torch.zeros_like(c)
    return torch.where(c > 0, -torch.log2(c.clamp_min(1) / total), torch.full_like(c, float("inf")))


def rd_mu(values: torch.Tensor, lam: float) -> float:
    """λ in the units of ``values``: λ·σ² with σ² the (population) variance of ``values``."""
    if lam == 0 or values.numel() < 2:
        return 0.0
    return float(lam) * float(values.double().var(unbiased=False))


def envelope(levels: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels that win somewhere, and where: for the costs (w - c_k)^2 + offsets_k, with ``levels``
    sorted ascending, (winners (J,) indices into levels, breaks (J-1,) with winner j for w in
    (breaks[j-1], breaks[j]]). A level of infinite offset never wins."""
    c = levels.double().tolist()
    b = [ck * ck + float(o) for ck, o in zip(c, offsets.double().tolist(), strict=True)]  # line k: -2c_k·w + b_k
    hull: list[int] = []

    def cross(i: int, j: int) -> float:  # where line j (c_j > c_i) becomes lower than line i
        return (b[j] - b[i]) / (2 * (c[j] - c[i]))

    for j in range(len(c)):
        if b[j] == float("inf"):
            continue
        if hull and c[j] == c[hull[-1]]:  # the same value twice: the cheaper one stands for both
            if b[j] >= b[hull[-1]]:
                continue
            hull.pop()
        while len(hull) >= 2 and cross(hull[-2], hull[-1]) >= cross(hull[-1], j):
            hull.pop()
        hull.append(j)
    breaks = [cross(hull[i], hull[i + 1]) for i in range(len(hull) - 1)]
    return torch.tensor(hull, dtype=torch.long), torch.tensor(breaks, dtype=torch.float64)


def rd_assign(values: torch.Tensor, levels: torch.Tensor, rates: torch.Tensor, mu: float) -> torch.Tensor:
    """Index of the level minimising (v - c_k)^2 + mu·rates_k for each value (levels sorted ascending)."""
    r = rates.double()
    offsets = torch.where(torch.isinf(r), r, mu * r)  # (0 * inf would be nan)
    winners, breaks = envelope(levels, offsets)
    # numpy's search: torch's costs milliseconds a call on a busy machine, and a grid makes one a channel
    at = np.searchsorted(breaks.numpy(), values.detach().double().cpu().numpy(), side="left")
    return winners[torch.from_numpy(at)]


def rd_rounds(
    values: torch.Tensor,
    levels: torch.Tensor,
    idx: torch.Tensor,
    mu: float | torch.Tensor,
    live: torch.Tensor | None = None,
    rate_model: RateModel = entropy_rates,
    rounds: int = RD_ROUNDS,
) -> torch.Tensor:
    """Assign, recount, reassign, starting from ``idx`` (indices into ``levels``, the nearest ones): the
    indices once a round changes nothing (or after ``rounds``). ``values`` (N,) with one ``mu``, or
    (C, K) rows with ``mu`` (C,), one trade per row (a grid's channels, each in units of its own step);
    the rates are counted over all of them (one code per tensor). ``live`` (the shape of values): only
    those values are counted and moved (the others, pruned zeros, keep their index)."""
    k = len(levels)
    if live is None:
        live = torch.ones_like(values, dtype=torch.bool)
    for _ in range(rounds):
        rates = rate_model(torch.bincount(idx[live], minlength=k))
        new = idx.clone()
        if values.dim() == 2:
            mus = torch.as_tensor(mu, dtype=torch.float64).tolist()
            for i in range(len(values)):
                new[i, live[i]] = rd_assign(values[i, live[i]], levels, rates, mus[i])
        else:
            new[live] = rd_assign(values[live], levels, rates, float(mu))
        if torch.equal(new, idx):
            break
        idx = new
    return idx


def empirical_entropy(idx: torch.Tensor, k: int) -> float:
    """Bits per symbol of the level indices' frequencies (what a per-tensor Huffman code approaches)."""
    if idx.numel() == 0:
        return 0.0
    p = torch.bincount(idx.long().flatten(), minlength=k).double() / idx.numel()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())
