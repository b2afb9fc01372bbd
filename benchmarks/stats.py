"""How a benchmark target is decided: paired rounds, a seeded bootstrap interval, a three-way verdict.

Every timed comparison runs its candidates once per round (:func:`benchmarks.common.interleave`), so the
rounds pair the candidates: round ``r`` of every candidate ran under the same load. A target's value is a
*statistic* of those rounds, as a rule the mean over the rounds of the per-round ratio ``a_r / b_r``
(:func:`mean_ratio`: a load change within a round hits both candidates and cancels in the ratio), and
its 95 % interval is the percentile bootstrap of that statistic: the rounds are resampled with
replacement, every candidate by the same round indices (pairs stay together), 2,000 times with a fixed
seed, so the same timings always give the same interval.

The verdict compares the whole interval with the limit: **met** when it lies within the limit, **missed**
when it lies wholly outside, **undecided** when it straddles the limit (the rounds cannot tell; more
rounds or a quieter machine can). A quantity that is counted rather than sampled (a FLOP count, a single
deterministic memory measurement) has no interval and is decided by its value; a sampled one with fewer
than two rounds has no spread to go on and is undecided.

Statistics are vectorized: they take ``{candidate: array of shape (resamples, rounds)}`` and return an
array of shape ``(resamples,)``; the point value is the statistic of the rounds as measured.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
MIN_ROUNDS = 2
VERDICTS = ("met", "missed", "undecided")

Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def per_round_mean(per_round: Callable[[Mapping[str, np.ndarray]], np.ndarray]) -> Statistic:
    """The mean over the rounds of ``per_round(rounds)``, a value per round computed from that round alone."""
    return lambda s: np.mean(per_round(s), axis=-1)


def mean_ratio(num: str, den: str, scale: float = 1.0) -> Statistic:
    """``scale * mean_r(num_r / den_r)``: the estimator of every "A / B" ratio of paired rounds."""
    return per_round_mean(lambda s: scale * s[num] / s[den])


def _arrays(rounds: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(v, dtype=float) for k, v in rounds.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"paired rounds need the same number of rounds per candidate, got {sorted(lengths)}")
    return arrays


def point(rounds: Mapping[str, Sequence[float]], statistic: Statistic) -> float:
    """The statistic of the rounds as measured."""
    return float(np.asarray(statistic({k: a[None, :] for k, a in _arrays(rounds).items()})).reshape(-1)[0])


def bootstrap_interval(rounds: Mapping[str, Sequence[float]], statistic: Statistic, resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` at ``level`` over the paired rounds (resampled with
    replacement, all candidates by the same round indices)."""
    arrays = _arrays(rounds)
    n = len(next(iter(arrays.values())))
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = np.asarray(statistic({k: a[idx] for k, a in arrays.items()}), dtype=float)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def within(value: float, op: str, limit: float) -> bool:
    """``value <op> limit`` for ``op`` in ``<=``, ``>=``."""
    if op == "<=":
        return value <= limit
    if op == ">=":
        return value >= limit
    raise ValueError(f"unknown comparison {op!r}; use '<=' or '>='")


def verdict(value: float, op: str, limit: float, low: float | None = None, high: float | None = None,
            rounds: int | None = None) -> str:
    """``met``, ``missed`` or ``undecided``: by the interval ``[low, high]`` when there is one, by the value
    when the quantity is counted (``rounds`` None and no interval); sampled with < 2 rounds: undecided."""
    if low is None or high is None:
        if rounds is not None and rounds < MIN_ROUNDS:
            return "undecided"
        return "met" if within(value, op, limit) else "missed"
    best, worst = (low, high) if op == "<=" else (high, low)
    if within(worst, op, limit):
        return "met"
    if not within(best, op, limit):
        return "missed"
    return "undecided"
