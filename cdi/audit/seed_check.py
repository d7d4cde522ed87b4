"""The seed check: how much the verdict p-value of *this* audit moves with ``--seed``.

Five of the default feature families (Denoising Loss, Multiple Loss, Noise
Optimisation, Gradient Masking, CLiD) average random noise draws seeded by
``--seed``; SecMI, PIA and SimA draw none (``FeatureFamily.draws_noise``).
A re-run with another seed therefore computes other feature values and
another verdict p-value, and an opposing expert will ask how far it moves
(issue 21: on the toy demo, ten seeds gave p from 2.6e-9 to 5.0e-6).

``cdi audit --seed-check K`` answers for the audit at hand instead of
quoting the demo: after the audit's own extraction it re-extracts the
noise-drawing families with ``K`` other seeds (``other_seeds``: ``seed + 1 ..
seed + K``, fixed by the audit's seed so nobody picks them), keeps every
other column as it is (those families draw nothing: their values are the same
for every seed), re-runs the same verdict test on each table and records every
p-value and decision word (``SeedCheck``). The verdict of the audit stays the
one at ``--seed``: that seed was chosen before the data were seen, the others
show how much that choice matters. Cost: ``K`` more extractions of the
noise-drawing families (their forward and backward calls per image are
recorded), none of the others; a store makes a repeated check free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from cdi.utils.errors import CDIError
from cdi.engine.table import FeatureTable
from cdi.audit.noise_draws import redrawn_tables

#: Most extra seeds one audit may run (each costs one more extraction of the noise-drawing families).
MAX_SEED_CHECK = 20


@dataclass
class SeedCheck:
    """The verdict test re-run at other seeds: what ``result.json`` records under ``seed_check``.

    ``seeds[0]`` is the audit's own seed; ``p_values`` and ``verdicts`` (the
    test's decision word, before the shift guard) follow the same order.
    ``p_kind`` is the p-value the verdict uses (parametric or permutation).
    """

    seeds: list[int]
    p_values: list[float]
    verdicts: list[str]
    p_kind: str
    families_redrawn: list[str]
    extra_calls_per_image: dict[str, int]

    @property
    def p_min(self) -> float:
        return float(min(self.p_values))

    @property
    def p_max(self) -> float:
        return float(max(self.p_values))

    @property
    def max_over_min(self) -> float | None:
        """``p_max / p_min``; None when the smallest p is 0 (a ratio would be meaningless)."""
        return None if self.p_min <= 0.0 else self.p_max / self.p_min

    @property
    def same_verdict(self) -> bool:
        return len(set(self.verdicts)) == 1

    def text(self) -> str:
        """One sentence for the report, true of what ran."""
        others = len(self.seeds) - 1
        ratio = self.max_over_min
        spread = ("the smallest p is 0" if ratio is None else
                  f"a factor of {ratio:,.1f}" if ratio < 100 else f"a factor of {ratio:,.0f}")
        agree = (f"the test's decision was `{self.verdicts[0]}` at every seed" if self.same_verdict else
                 "the test's decision differed between seeds (" + ", ".join(
                     f"seed {s}: {v}" for s, v in zip(self.seeds, self.verdicts)) + ")")
        return (f"Seed check: the features of {', '.join(self.families_redrawn)} were re-extracted with {others} "
                f"other seed{'s' if others != 1 else ''} ({', '.join(str(s) for s in self.seeds[1:])}); with the "
                f"audit's seed {self.seeds[0]} the {self.p_kind} p-values ranged from {self.p_min:.2g} to "
                f"{self.p_max:.2g}, {spread}; {agree}. The verdict above is the one at seed {self.seeds[0]}.")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(p_min=self.p_min, p_max=self.p_max, max_over_min=self.max_over_min,
                   same_verdict=self.same_verdict, text=self.text())
        return out


def check_seed_check(count: int) -> None:
    """``--seed-check`` is a whole number of extra seeds, 0 (off) to ``MAX_SEED_CHECK``."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_SEED_CHECK:
        raise CDIError(f"--seed-check must be a whole number of extra seeds from 0 (off) to {MAX_SEED_CHECK}, "
                       f"got {count!r}; each one re-extracts the noise-drawing features once")


def other_seeds(seed: int, count: int) -> list[int]:
    """The ``count`` seeds after ``seed`` (wrapping below 2**63): fixed by the audit's seed, chosen by nobody."""
    return [(int(seed) + j) % (2**63) for j in range(1, int(count) + 1)]


def run_seed_check(
    tables: Sequence[FeatureTable],
    redrawn: dict[int, Sequence[Sequence[FeatureTable]]],
    *,
    seed: int,
    families_redrawn: Sequence[str],
    test: Callable[[list[tuple[np.ndarray, np.ndarray]]], tuple[float, str]],
    first: tuple[float, str],
    p_kind: str,
    calls_per_image: dict[str, int],
) -> SeedCheck:
    """The verdict test on the audit's tables with the columns of other seeds' draws swapped in.

    ``tables`` are the audit's (published, unpublished) tables at ``seed``;
    ``redrawn`` maps each other seed to its noise draws, each the
    (published, unpublished) tables of the noise-drawing families
    ``families_redrawn`` (as many draws as the audit makes,
    ``cdi.audit.noise_draws``); ``test(arrays)`` returns (verdict p,
    decision word) of the audit's own test on one (published, unpublished)
    array pair per draw; ``first`` is that pair at ``seed``;
    ``calls_per_image`` the network calls of one extraction of the redrawn
    families (multiplied by the extractions the check made).
    """
    p_values, verdicts = [float(first[0])], [str(first[1])]
    for draws in redrawn.values():
        p, word = test([tuple(redrawn_tables(tables, draw)) for draw in draws])
        p_values.append(float(p))
        verdicts.append(str(word))
    extractions = sum(len(draws) for draws in redrawn.values())
    extra = {k: int(v) * extractions for k, v in calls_per_image.items()}
    return SeedCheck(seeds=[int(seed), *(int(s) for s in redrawn)], p_values=p_values, verdicts=verdicts,
                     p_kind=p_kind, families_redrawn=list(families_redrawn), extra_calls_per_image=extra)
