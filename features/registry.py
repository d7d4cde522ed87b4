"""The feature families by name, the named feature sets, and their totals.

``cdi`` is the 26-feature set of the CDI paper (REFERENCE.md section 1):
Denoising Loss (1), SecMI_stat (1), PIA and PIAN (2), Multiple Loss (10),
Noise Optimisation (2) and Gradient Masking (10): 56 forward and 15 backward
model calls per image as the reference counts them, 43 forward and 14
backward here, because the calls that several families make are made once
(``features.calls``). ``cdi+clid`` appends CLiD's ``[L(c), D_1..D_k]``
(REFERENCE.md section 2), an addition of this toolkit, for conditional models.

The default sets are ``cdi+sima`` (unconditional models) and
``cdi+clid+sima`` (conditional ones): the paper's families, CLiD where there
is a condition, and SimA (REFERENCE.md section 9), whose four columns cost
three network calls per image (its t = 0 call is PIA's) and which raised the
verdict's power at every size of the toy power table (docs/notes/issue-12-verdict.md).
``cdi`` and ``cdi+clid`` stay as the sets of the papers, for reproducing them.
"""

from __future__ import annotations

from typing import Sequence

from cdi.utils.errors import CDIError
from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, FeatureFamily
from cdi.features.calls import shared_savings
from cdi.features.clid import CLiD
from cdi.features.denoising_loss import DenoisingLoss
from cdi.features.gradient_masking import GradientMasking
from cdi.features.gsa import GSA1, GSA2
from cdi.features.multiple_loss import MultipleLoss
from cdi.features.noise_optimization import NoiseOptimization
from cdi.features.pfami import PFAMI
from cdi.features.pia import PIA
from cdi.features.secmi import SecMI
from cdi.features.sima import SimA

FAMILIES: dict[str, type[FeatureFamily]] = {
    cls.name: cls
    for cls in [DenoisingLoss, SecMI, PIA, MultipleLoss, NoiseOptimization, GradientMasking, CLiD,
                PFAMI, GSA1, GSA2, SimA]
}

FEATURE_SETS: dict[str, list[str]] = {
    "cdi": ["denoising_loss", "secmi", "pia", "multiple_loss", "noise_optimization", "gradient_masking"],
}
FEATURE_SETS["cdi+clid"] = FEATURE_SETS["cdi"] + ["clid"]
FEATURE_SETS["cdi+sima"] = FEATURE_SETS["cdi"] + ["sima"]
FEATURE_SETS["cdi+clid+sima"] = FEATURE_SETS["cdi+clid"] + ["sima"]


def resolve_features(spec: str) -> list[FeatureFamily]:
    """The families named by ``spec``, with their default configurations.

    ``spec`` is a feature-set name (``"cdi"``, ``"cdi+clid"``) or a comma
    separated list of family and set names; repeated names count once and
    the order of first mention is kept.
    """
    names: list[str] = []
    for token in (part.strip().lower() for part in str(spec).split(",")):
        if not token:
            continue
        if token in FEATURE_SETS:
            expanded = FEATURE_SETS[token]
        elif token in FAMILIES:
            expanded = [token]
        else:
            raise CDIError(
                f"unknown feature family or set {token!r}; valid sets: {', '.join(FEATURE_SETS)}; "
                f"valid families: {', '.join(FAMILIES)}"
            )
        names.extend(n for n in expanded if n not in names)
    if not names:
        raise CDIError(
            f"no features given; use a set ({', '.join(FEATURE_SETS)}) or a comma-separated list of "
            f"families ({', '.join(FAMILIES)})"
        )
    return [FAMILIES[n]() for n in names]


def default_feature_set(adapter: DiffusionAdapter) -> str:
    """``"cdi+clid+sima"`` for conditional models (text or class), ``"cdi+sima"`` otherwise."""
    return default_set_for(adapter.conditioning)


def default_set_for(conditioning: str) -> str:
    """The default feature set of a model conditioned on ``"text"``, ``"class"`` or ``"none"``."""
    return "cdi+sima" if conditioning == "none" else "cdi+clid+sima"


def columns_of(families: Sequence[FeatureFamily], adapter: DiffusionAdapter | None = None) -> list[str]:
    """All output columns, family by family (CLiD's count depends on the adapter)."""
    columns = [c for f in families for c in f.columns(adapter)]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise CDIError(f"feature columns {duplicated} appear twice; list each family once")
    return columns


def directions_of(families: Sequence[FeatureFamily], adapter: DiffusionAdapter | None = None) -> list[int]:
    """Member direction per column (+1 higher = member, -1 lower = member), as ``columns_of``."""
    return [d for f in families for d in f.directions(adapter)]


def total_cost(families: Sequence[FeatureFamily], adapter: DiffusionAdapter) -> Cost:
    """Model calls per image for all families together, each shared call counted once."""
    total = Cost(0, 0)
    for family in families:
        total = total + family.cost(adapter)
    saved = shared_savings(families, adapter)
    return Cost(total.forward - saved.forward, total.backward - saved.backward)


#: The verdict p-value over feature seeds on the toy demo's own folders, as measured (issue 21, session 6):
#: ``cdi demo --out demo-out``, then ``cdi audit`` on its ``data/published`` and ``data/unpublished`` with the
#: demo's model, ``--seed 1 --seed-check 4`` (default features, default 2 noise draws; result.json ``seed_check``).
DEMO_SEED_SPREAD = {
    "what": "verdict p-value of cdi demo's folders (toy SD, 150 + 150 images, cdi+clid+sima, 2 noise draws, "
            "reliability-weighted) over feature seeds 1 to 5",
    "seeds": 5,
    "p_min": 6.2e-11,
    "p_max": 3.7e-10,
    "max_over_min": 6.0,
    "command": "cdi audit --published demo-out/data/published --unpublished demo-out/data/unpublished "
               "--model ~/.cache/cdi/toy/sd-overtrained-seed0/model --out seed-check --seed 1 --seed-check 4",
}


def seed_dependence(families: Sequence[FeatureFamily], this_audit: str | None = None) -> dict:
    """How the feature values of ``families`` depend on ``--seed``, for result.json and the report.

    ``families_drawing_noise`` lists the families whose values average
    random noise draws seeded by the seed (``FeatureFamily.draws_noise``);
    ``text`` says in words what that means for the verdict, with the spread
    measured on the toy demo (``DEMO_SEED_SPREAD``) when some family draws
    noise; ``demo_measurement`` holds that measurement. ``this_audit`` is the
    sentence of the audit's own seed check (``cdi.audit.seed_check``), when
    it ran: the text then quotes it instead of saying the spread was not
    measured.
    """
    noisy = [f.name for f in families if f.draws_noise]
    free = [f.name for f in families if not f.draws_noise]
    if not noisy:
        return {"families_drawing_noise": [], "seed_free_families": free, "demo_measurement": None,
                "text": "No feature family here draws noise: the feature values, hence the verdict's parametric "
                        "p-value, are the same for every seed."}
    m = DEMO_SEED_SPREAD
    text = (f"The features of {', '.join(noisy)} are computed from random noise draws seeded by the seed, so an "
            f"audit re-run with another seed computes other feature values and another verdict p-value"
            f"{' (' + ', '.join(free) + ' draw no noise)' if free else ''}. "
            + (this_audit + " For comparison, " if this_audit else "How much it moves was not measured for this "
               "audit (`cdi audit --seed-check K` measures it); ")
            + f"on the toy demo's folders (150 + 150 images, default features) {m['seeds']} seeds "
            f"gave verdict p-values from {m['p_min']:.1e} to {m['p_max']:.1e}, a factor of {m['max_over_min']:,.0f}.")
    return {"families_drawing_noise": noisy, "seed_free_families": free, "demo_measurement": dict(m), "text": text}
