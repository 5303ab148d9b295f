"""The merge rules, one output tensor at a time.

Definitions follow mergekit 0.1.5 (`mergekit/merge_methods/*.py`, `mergekit/sparsify.py`) so a
merge here equals mergekit's on the same inputs; tests check that. Math runs in float32 (float64
for float64 inputs); the caller casts the result to the output dtype.

  linear           sum_i w_i x_i, divided by sum_i w_i when normalize (Wortsman et al. 2022,
                   model soups)
  slerp            spherical interpolation of the two whole tensors, linear when they are
                   (anti)colinear
  task_arithmetic  base + sum_i w_i (x_i - base)             (Ilharco et al. 2023)
  ties             trim each task vector to its top-`density` magnitudes, elect a sign per
                   entry from the weighted sum, average the agreeing entries (Yadav et al. 2023)
  dare_ties        like ties, but drop entries at random (keep prob. `density`) and rescale the
                   kept ones (Yu et al. 2024, DARE)
  dare_linear      DARE drop and rescale, then plain task arithmetic
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from raypost.merging.config import METHODS, NEEDS_BASE  # noqa: F401  (the methods' names live with the config)

# mergekit's constants: above this cosine the tensors are treated as colinear (lerp instead of
# slerp); norms below SLERP_EPS count as zero; L1 norms below RESCALE_EPS are not rescaled.
DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class TaskArithmeticRule:
    """One member of mergekit's generalized task arithmetic family."""

    sparsification: str | None  # None | "magnitude" | "random"
    consensus: bool  # TIES sign election ("sum" consensus)
    default_normalize: bool
    default_rescale: bool


TASK_RULES = {
    "task_arithmetic": TaskArithmeticRule(None, False, default_normalize=False, default_rescale=False),
    "ties": TaskArithmeticRule("magnitude", True, default_normalize=True, default_rescale=False),
    "dare_ties": TaskArithmeticRule("random", True, default_normalize=False, default_rescale=True),
    "dare_linear": TaskArithmeticRule("random", False, default_normalize=False, default_rescale=True),
}


def default_normalize(method: str) -> bool:
    return True if method == "linear" else TASK_RULES[method].default_normalize if method in TASK_RULES else False


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def linear(tensors: Iterable[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """`tensors` may be a lazy iterable: only the running sum and one input are held at a time."""
    result = coefficients = None
    for index, tensor in enumerate(tensors):
        if result is None:
            dtype = compute_dtype(tensor)
            coefficients = torch.tensor(weights, dtype=dtype)
            result = torch.zeros_like(tensor, dtype=dtype)
        result.addcmul_(tensor.to(dtype), coefficients[index])
        del tensor
    if normalize:
        result.div_(coefficients.sum())
    return result


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), treating each tensor as one vector.

    The angle comes from the normalized tensors; the interpolation is applied to the raw ones,
    so norms are interpolated too. Nearly colinear or antipodal pairs fall back to lerp.
    """
    dtype = compute_dtype(v0)
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return a.reshape(v0.shape)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > SLERP_EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > SLERP_EPS else torch.ones_like(norm_b)
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(torch.tensor(dot, dtype=dtype))
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def l1_rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Apply a 0/1 mask; with rescale, scale the survivors so the L1 norm is unchanged.

    mergekit 0.1.5 rescales DARE by matching L1 norms, whose expectation is the paper's
    1/density factor.
    """
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude_sparsify(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest |delta| (at least one)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    # mergekit's exact selection: fine-tuned bf16 weights give many equal |delta| at the cut-off,
    # and argsort's tie order is what makes the kept set identical to mergekit's (topk is ~5x
    # faster but breaks those ties differently).
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return l1_rescaled(delta, mask.reshape_as(delta), rescale)


def random_sparsify(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=torch.float32), generator=generator)
    return l1_rescaled(delta.to(torch.float32), mask, rescale).to(delta.dtype)


def task_arithmetic_family(
    rule: TaskArithmeticRule,
    base: torch.Tensor,
    tensors: Iterable[torch.Tensor],
    weights: list[float],
    *,
    density: float,
    normalize: bool,
    rescale: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`tensors` (one per weight) may be lazy: each input is dropped once its delta is taken."""
    dtype = compute_dtype(base)
    base = base.to(dtype)
    deltas = torch.empty((len(weights), *base.shape), dtype=dtype)
    for i, tensor in enumerate(tensors):
        delta = tensor.to(dtype) - base
        del tensor
        if rule.sparsification == "magnitude":
            delta = magnitude_sparsify(delta, density, rescale)
        elif rule.sparsification == "random":
            delta = random_sparsify(delta, density, rescale, generator)
        deltas[i] = delta
        del delta
    coefficients = torch.tensor(weights, dtype=dtype).reshape(-1, *([1] * base.dim()))
    deltas.mul_(coefficients)
    if rule.consensus:
        # TIES sign election: the sign of the summed (weighted) task vectors wins; only the
        # entries that agree with it are merged, averaged over the weights that contributed.
        majority = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
        agree = deltas.sign().eq_(majority)  # 1.0 where the entry agrees (zeros never do)
        divisor = torch.zeros_like(base)
        for i in range(len(weights)):
            divisor.add_(agree[i] * coefficients[i])
        mixed = deltas.mul_(agree).sum(dim=0)
        del agree, deltas
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        del deltas
        divisor = coefficients.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    return mixed.add_(base)
