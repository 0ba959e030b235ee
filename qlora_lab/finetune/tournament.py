"""The tournament: games from a judge's verdicts, and Elo ratings over random
orderings of them (QLoRA Sec. 5, in miniature; the verdicts are
:mod:`qlora_lab.finetune.judge`'s).

Each verdict on a pair of answers is a game. Every pair was judged in both
orders; a game shows it in one order drawn by a coin (:func:`random_order_games`,
the tournament's randomised presentation order), or takes both orders together
and counts a verdict that flips with the order as a tie (:func:`both_order_games`).

**Elo depends on the order of the games.** Sequential Elo updates (:func:`elo`)
give a different result for every ordering of the same games, so the paper
computes the ratings over many random orderings and reports their mean and a
95% interval (:func:`elo_over_orderings`; initial rating 1000, K = 32).
:func:`win_matrix` is the share of its games each player won against each other.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from qlora_lab.finetune.judge import Verdict, verdicts_by_pair

ELO_INITIAL = 1000.0
ELO_K = 32.0

Game = tuple[str, str, float]  # (player a, player b, score of a: 1 win, 0 loss, 0.5 tie)


def random_order_games(verdicts: Sequence[Verdict], seed: int = 0) -> list[Game]:
    """One game per (question, pair): the verdict of one of its two orders,
    chosen by a coin (the tournament's randomised presentation order)."""
    rng = random.Random(seed)
    games = []
    for _, (v1, v2) in sorted(verdicts_by_pair(verdicts).items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]))):
        v = v1 if rng.random() < 0.5 else v2
        games.append((v.first, v.second, 1.0 if v.p_first > 0.5 else 0.0))
    return games


def both_order_games(verdicts: Sequence[Verdict]) -> list[Game]:
    """One game per (question, pair) from both orders together: a win if the same
    player wins in both orders, a tie if the verdict flips with the order."""
    games = []
    for _, (v1, v2) in sorted(verdicts_by_pair(verdicts).items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]))):
        a, b = v1.first, v1.second
        wins_a = (v1.p_first > 0.5) + (v2.p_first <= 0.5)
        games.append((a, b, wins_a / 2))
    return games


def elo(games: Sequence[Game], players: Sequence[str], k: float = ELO_K,
        initial: float = ELO_INITIAL) -> dict[str, float]:
    """Sequential Elo: after each game both ratings move by ``k`` times the
    difference between the score and the expected score
    ``1 / (1 + 10 ** ((R_b - R_a) / 400))``."""
    ratings = {p: float(initial) for p in players}
    for a, b, score_a in games:
        if a not in ratings or b not in ratings:
            raise ValueError(f"game between {a!r} and {b!r}: both must be among the players {list(players)}")
        expected_a = 1.0 / (1.0 + 10 ** ((ratings[b] - ratings[a]) / 400.0))
        ratings[a] += k * (score_a - expected_a)
        ratings[b] -= k * (score_a - expected_a)
    return ratings


@dataclass(frozen=True)
class EloRow:
    player: str
    mean: float
    low: float   # 2.5th percentile over orderings
    high: float  # 97.5th percentile


def elo_over_orderings(games: Sequence[Game], players: Sequence[str], orderings: int = 1000, seed: int = 0,
                       k: float = ELO_K, initial: float = ELO_INITIAL) -> list[EloRow]:
    """Elo over ``orderings`` random permutations of the same games: mean and
    95% interval per player, best first (the paper's procedure)."""
    if orderings < 1:
        raise ValueError(f"orderings must be at least 1, got {orderings}")
    if not games:
        raise ValueError("elo_over_orderings needs at least one game")
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {p: [] for p in players}
    games = list(games)
    for _ in range(orderings):
        rng.shuffle(games)
        for p, r in elo(games, players, k, initial).items():
            samples[p].append(r)
    rows = []
    for p, xs in samples.items():
        xs.sort()
        lo = xs[int(0.025 * (len(xs) - 1))]
        hi = xs[int(round(0.975 * (len(xs) - 1)))]
        rows.append(EloRow(p, sum(xs) / len(xs), lo, hi))
    return sorted(rows, key=lambda row: -row.mean)


def win_matrix(games: Sequence[Game], players: Sequence[str]) -> dict[tuple[str, str], float]:
    """Share of the games between ``a`` and ``b`` that ``a`` won (ties count half)."""
    played: dict[tuple[str, str], list[float]] = defaultdict(list)
    for a, b, s in games:
        played[(a, b)].append(s)
        played[(b, a)].append(1 - s)
    return {(a, b): sum(played[(a, b)]) / len(played[(a, b)])
            for a in players for b in players if a != b and played[(a, b)]}
