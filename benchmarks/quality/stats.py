"""The statistics of benchmarks/quality/run.py: the learning rate a sweep picks, means and spreads over
seeds, the equal-parameters check, and when a difference between two variants is called
significant.

Spread over seeds: the sample standard deviation s = sqrt(sum (x_i - mean)^2 / (n - 1)).

Significance rule: variants A and B (n_A and n_B seeds) differ significantly in a metric when

    |mean_A - mean_B| > K * s_p,    s_p = sqrt(((n_A - 1) s_A^2 + (n_B - 1) s_B^2) / (n_A + n_B - 2))

with K = 2: the means must be further apart than twice the pooled spread of single runs. With
3 seeds each, the standard error of the difference is s_p sqrt(2/3) = 0.82 s_p, so the rule asks
for about 2.4 standard errors (a two-sided t-test with 4 degrees of freedom would ask for 2.78
at the 5% level). With fewer than 3 runs in all (n_A + n_B - 2 < 1) there is no spread to compare
with, and nothing is called significant or not (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

K = 2.0
PARAMETER_TOLERANCE = 0.05  # "equal parameters": within 5% of the reference variant's count
RULE = (
    f"significant when |difference of the means| > {K:g} x pooled standard deviation of single runs "
    "s_p = sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)), s = sample standard deviation over seeds"
)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation); the deviation is None for fewer than two values."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1))


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float | None:
    """s_p of the module docstring; None without a degree of freedom (len(a) + len(b) < 3)."""
    dof = len(a) + len(b) - 2
    if dof < 1:
        return None
    squares = [math.fsum((x - mean_std(xs)[0]) ** 2 for x in xs) for xs in (a, b)]
    return math.sqrt(math.fsum(squares) / dof)


def compare(reference: Sequence[float], other: Sequence[float]) -> dict:
    """`other` against `reference` by the module's rule: difference of the means (other minus
    reference), s_p, the threshold K s_p, and whether the difference exceeds it (None: no spread)."""
    diff = mean_std(other)[0] - mean_std(reference)[0]
    sp = pooled_std(reference, other)
    return {
        "difference": diff,
        "pooled_std": sp,
        "threshold": None if sp is None else K * sp,
        "significant": None if sp is None else abs(diff) > K * sp,
    }


def best_lr(sweep: dict[float, float]) -> tuple[float, bool]:
    """(the lr of the lowest metric in `sweep` {lr: metric}, whether it is at an end of the grid:
    then a better lr may lie outside it). A non-finite metric (a diverged run) never wins."""
    finite = {lr: m for lr, m in sweep.items() if math.isfinite(m)}
    if not finite:
        raise ValueError(f"every run of the sweep diverged: {sweep}")
    lr = min(finite, key=finite.get)
    grid = sorted(sweep)
    return lr, len(grid) > 1 and lr in (grid[0], grid[-1])


def parameter_check(counts: dict[str, int], reference: str) -> dict[str, dict]:
    """Per variant: its count, the relative difference to `reference`'s, and whether it is within
    PARAMETER_TOLERANCE."""
    ref = counts[reference]
    return {
        name: {
            "parameters": n,
            "relative_to_reference": (n - ref) / ref,
            "within": abs(n - ref) <= PARAMETER_TOLERANCE * ref,
        }
        for name, n in counts.items()
    }


def reference_variant(variants: Sequence[str], means: dict[str, float] | None = None) -> str:
    """What the others are compared with: rtf16 when it ran; else the best (lowest `means`) of the
    Hyena-RTF variants that ran (RTF filters: rtf64, multihyena, hybrid); else the first variant."""
    if "rtf16" in variants:
        return "rtf16"
    rtf = [v for v in variants if v in ("rtf64", "multihyena", "hybrid")]
    if rtf and means:
        return min(rtf, key=lambda v: means.get(v, math.inf))
    return rtf[0] if rtf else variants[0]
