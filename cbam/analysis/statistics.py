"""A configuration against its baseline over seeds: the difference of means with Welch's t interval.

Welch's interval does not assume equal variances; with 3 seeds per side it is wide, and saying so is the
point: a difference whose interval contains zero is not shown by these runs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Difference:
    """``mean(values) - mean(baseline)`` with its confidence interval (None with fewer than two values
    on either side: no variance to estimate)."""

    difference: float
    low: float | None
    high: float | None

    @property
    def contains_zero(self) -> bool | None:
        return None if self.low is None else self.low <= 0 <= self.high


def welch_difference(
    values: list[float], baseline: list[float], confidence: float = CONFIDENCE
) -> Difference:
    """The difference of means and its Welch t interval (Welch-Satterthwaite degrees of freedom)."""
    if not values or not baseline:
        raise ValueError("welch_difference needs at least one value on each side")
    difference = statistics.fmean(values) - statistics.fmean(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return Difference(difference, None, None)
    shares = [statistics.variance(side) / len(side) for side in (values, baseline)]
    standard_error = math.sqrt(sum(shares))
    if standard_error == 0:  # identical values on both sides: the difference is exact
        return Difference(difference, difference, difference)
    freedom = standard_error**4 / sum(
        share**2 / (len(side) - 1) for share, side in zip(shares, (values, baseline))
    )
    half_width = stats.t.ppf(0.5 + confidence / 2, freedom) * standard_error
    return Difference(difference, difference - half_width, difference + half_width)


def in_words(label: str, baseline_label: str, result: Difference, n: int, baseline_n: int) -> str:
    """One sentence on ``result`` in percentage points of accuracy."""
    head = f"{label} vs {baseline_label}: {100 * result.difference:+.2f} points"
    if result.low is None:
        return f"{head}; no interval (n = {n} vs {baseline_n}: at least two seeds on each side are needed)."
    interval = f"{100 * result.low:+.2f} to {100 * result.high:+.2f}"
    if result.contains_zero:
        return (
            f"{head} ({CONFIDENCE:.0%} CI {interval}): the interval contains zero, so these "
            f"{n} vs {baseline_n} seeds do not show a difference."
        )
    direction = "better" if result.difference > 0 else "worse"
    return (
        f"{head} ({CONFIDENCE:.0%} CI {interval}): the interval excludes zero; {direction} than the baseline."
    )
