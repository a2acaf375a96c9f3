"""The numbers of a preference study, from its votes (numpy only).

- :func:`preference`: the share of votes for system a, for system b and for a tie (the three add up
  to 1), each with a 95% interval from :func:`crossed_bootstrap`, which resamples pairs and raters
  together (both are samples: another study would have other prompts *and* other people);
- :func:`rater_consistency`: per rater, how many of the repeated, side-swapped check pairs got the
  same answer both times;
- :func:`fleiss_kappa`: agreement between raters beyond chance, over the pairs;
- :func:`summarize`: all of it, for every rater and for the consistent ones only, as the JSON of
  ``img-guidance study results --json``.

Only a pair's first showing counts as a vote; the repeat of a check pair is used for consistency only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

OUTCOMES = ("a", "b", "tie")
# Elements of one chunk of bootstrap weights times counts (float64: 32 MiB), so memory stays flat.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Vote:
    """One answer: ``outcome`` is the system the rater chose ("a", "b") or "tie"; ``repeat`` marks the
    second, side-swapped showing of a check pair."""

    rater: str
    pair: int
    outcome: str
    repeat: bool = False


def vote_counts(votes: Sequence[Vote]) -> tuple[list[str], list[int], np.ndarray]:
    """The raters and pairs with a (first-showing) vote, in first-seen order, and the counts
    ``[raters, pairs, 3]`` of their outcomes (a, b, tie), each cell 0 or 1."""
    first = [v for v in votes if not v.repeat]
    raters = list(dict.fromkeys(v.rater for v in first))
    pairs = list(dict.fromkeys(v.pair for v in first))
    r_index = {r: i for i, r in enumerate(raters)}
    p_index = {p: i for i, p in enumerate(pairs)}
    counts = np.zeros((len(raters), len(pairs), len(OUTCOMES)))
    for v in first:
        if v.outcome not in OUTCOMES:
            raise ValueError(f"a vote's outcome must be one of {', '.join(OUTCOMES)}, got {v.outcome!r}")
        cell = counts[r_index[v.rater], p_index[v.pair]]
        if cell.any():
            raise ValueError(f"rater {v.rater!r} has two votes on pair {v.pair}")
        cell[OUTCOMES.index(v.outcome)] = 1
    return raters, pairs, counts


def crossed_bootstrap(counts: np.ndarray, *, resamples: int = 10000, seed: int = 0) -> np.ndarray:
    """95% percentile intervals ``[categories, 2]`` of each category's share of the votes, resampling
    raters and pairs independently, with replacement (a two-way crossed bootstrap): a resample keeps
    every vote of a drawn rater on a drawn pair, as often as both were drawn.

    ``counts`` is ``[raters, pairs, categories]``; a rater who did not rate a pair has zeros there.
    Resamples that happen to hold no vote are left out. Deterministic in ``seed``."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3:
        raise ValueError(f"counts must be [raters, pairs, categories], got shape {counts.shape}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    raters, pairs, categories = counts.shape
    if counts.sum() == 0:
        return np.full((categories, 2), np.nan)
    rng = np.random.default_rng(seed)
    flat = counts.reshape(raters, pairs * categories)
    rows = max(1, _CHUNK_ELEMENTS // (pairs * categories))
    shares = []
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        u = rng.multinomial(raters, np.full(raters, 1 / raters), size=size)  # [size, raters] draws of each
        w = rng.multinomial(pairs, np.full(pairs, 1 / pairs), size=size)  # [size, pairs]
        # [size, raters] @ [raters, pairs*C] -> [size, pairs, C], weighted by pair draws -> [size, C]
        totals = ((u @ flat).reshape(size, pairs, categories) * w[:, :, None]).sum(axis=1)
        votes = totals.sum(axis=1)
        shares.append(totals[votes > 0] / votes[votes > 0, None])
    low, high = np.quantile(np.concatenate(shares), [0.025, 0.975], axis=0)
    return np.stack([low, high], axis=1)


def preference(counts: np.ndarray, *, resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Each outcome's share of the votes of ``counts`` ``[raters, pairs, 3]`` with its crossed
    bootstrap interval: ``{"a": {"preferred", "ci95", "votes"}, "b": {...}, "ties", "ties_ci95",
    "tie_votes", "votes"}``; rates and intervals are None where there is no vote."""
    totals = counts.sum(axis=(0, 1)) if counts.size else np.zeros(len(OUTCOMES))
    n = int(totals.sum())
    intervals = crossed_bootstrap(counts, resamples=resamples, seed=seed) if n else None

    def rate(i: int) -> tuple[float | None, list[float] | None]:
        if not n:
            return None, None
        return float(totals[i] / n), [float(x) for x in intervals[i]]

    (a, a_ci), (b, b_ci), (tie, tie_ci) = rate(0), rate(1), rate(2)
    return {
        "a": {"preferred": a, "ci95": a_ci, "votes": int(totals[0])},
        "b": {"preferred": b, "ci95": b_ci, "votes": int(totals[1])},
        "ties": tie,
        "ties_ci95": tie_ci,
        "tie_votes": int(totals[2]),
        "votes": n,
    }


def fleiss_kappa(table: np.ndarray) -> float | None:
    """Fleiss' kappa of ``table`` ``[subjects, categories]`` (how many raters put each subject in
    each category): ``(P - Pe) / (1 - Pe)``, where ``P`` is the mean over subjects of the share of
    agreeing rater pairs, ``sum_j n_ij (n_ij - 1) / (n_i (n_i - 1))``, and ``Pe = sum_j p_j**2`` with
    ``p_j`` the share of all votes in category j. Subjects rated by fewer than two raters are left
    out, and subjects may have different numbers of raters. None where it is undefined: no subject
    with two raters, or every vote in one category (``Pe = 1``)."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"table must be [subjects, categories], got shape {table.shape}")
    n = table.sum(axis=1)
    table, n = table[n >= 2], n[n >= 2]
    if len(table) == 0:
        return None
    agreement = (table * (table - 1)).sum(axis=1) / (n * (n - 1))  # [subjects]
    p = table.sum(axis=0) / table.sum()  # [categories]
    chance = float((p**2).sum())
    if np.isclose(chance, 1.0):
        return None
    return float((agreement.mean() - chance) / (1 - chance))


def rater_consistency(votes: Sequence[Vote]) -> dict[str, dict[str, Any]]:
    """Per rater (with any vote): ``{"checks": check pairs answered both times, "agree": answered
    alike (the same system, or tie both times), "rate": agree / checks or None}``."""
    first = {(v.rater, v.pair): v.outcome for v in votes if not v.repeat}
    result = {v.rater: {"checks": 0, "agree": 0, "rate": None} for v in votes}
    for v in votes:
        if v.repeat and (v.rater, v.pair) in first:
            entry = result[v.rater]
            entry["checks"] += 1
            entry["agree"] += int(first[(v.rater, v.pair)] == v.outcome)
    for entry in result.values():
        if entry["checks"]:
            entry["rate"] = entry["agree"] / entry["checks"]
    return result


def _block(votes: Sequence[Vote], *, resamples: int, seed: int) -> dict[str, Any]:
    """Preference, its intervals, counts and kappa of one set of votes."""
    raters, pairs, counts = vote_counts(votes)
    out = preference(counts, resamples=resamples, seed=seed)
    out["raters"], out["pairs"] = len(raters), len(pairs)
    out["kappa"] = fleiss_kappa(counts.sum(axis=0)) if counts.size else None
    return out


def summarize(
    votes: Sequence[Vote],
    *,
    names: tuple[str, str] = ("a", "b"),
    min_consistency: float = 0.5,
    resamples: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """The study's numbers: everything of :func:`preference` with ``raters``, ``pairs`` and
    ``kappa`` for all raters; ``consistency`` per rater (``kept`` where the rate is at least
    ``min_consistency``, or where the rater answered no check twice); and the same numbers over the
    kept raters only, under ``consistent``. a and b carry their ``name``."""
    if not 0.0 <= min_consistency <= 1.0:
        raise ValueError(f"min_consistency must lie in [0, 1], got {min_consistency}")
    consistency = rater_consistency(votes)
    for entry in consistency.values():
        entry["kept"] = entry["rate"] is None or entry["rate"] >= min_consistency
    kept = [v for v in votes if consistency[v.rater]["kept"]]
    result = _block(votes, resamples=resamples, seed=seed)
    consistent = _block(kept, resamples=resamples, seed=seed)
    for block in (result, consistent):
        block["a"] = {"name": names[0], **block["a"]}
        block["b"] = {"name": names[1], **block["b"]}
    return {
        **result,
        "check_votes": sum(1 for v in votes if v.repeat),
        "consistency": {
            "min_consistency": min_consistency,
            "raters": consistency,
            "excluded": [r for r, e in consistency.items() if not e["kept"]],
        },
        "consistent": consistent,
        "resamples": resamples,
        "seed": seed,
    }
