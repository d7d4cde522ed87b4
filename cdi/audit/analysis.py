"""Steps 4 and 5 of the audit from feature tables alone: tests, sample size, shift guard, verdict, result.

``analyse_tables`` needs only the feature tables, so stored features can be re-tested without the model;
``build_result`` turns an analysis into the ``AuditResult`` that ``result.json`` records.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import special

from cdi.utils.environment import environment_report
from cdi.audit.result import AuditResult, FeatureWeight, ImageScore, SampleSizeCurve, ShiftGuard
from cdi.engine.table import FeatureTable

from cdi.audit.config import AuditConfig, reproduce_command

@dataclass
class Analysis:
    """What ``analyse_tables`` concluded (the model-dependent part of a result)."""

    verdict: str
    test: Any  # cdi.stats.verdict.TestResult
    curve: SampleSizeCurve | None
    shift: ShiftGuard | None
    seconds: dict[str, float]
    estimate: dict[str, Any] | None = None  # cdi.stats.sample_size.ForwardSampleSize.to_dict()
    encoding: Any = None  # cdi.data.shift_guard.EncodingGuardResult, when the files were probed
    encoding_blocks: bool = False  # an encoding difference nobody harmonised (EncodingGuardResult.blocks_verdict)
    draws: Sequence[tuple[np.ndarray, np.ndarray]] = ()  # the further noise draws' (published, unpublished) arrays




def analyse_tables(
    published: FeatureTable,
    unpublished: FeatureTable,
    *,
    directions: Sequence[int] | None,
    config: AuditConfig,
    shift_features: tuple[np.ndarray, np.ndarray, str] | None = None,
    encodings: tuple[Sequence, Sequence, bool] | None = None,
    draws: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> Analysis:
    """Tests, sample-size curve, shift guard and verdict from feature tables alone.

    ``shift_features`` is ``(descriptors of P, descriptors of U, encoder name)``
    for the shift guard; None skips the guard (recorded as not run).
    ``encodings`` is ``(probes of P, probes of U, harmonised)``
    (``cdi.data.harmonise.EncodingProbe``) for the guard's encoding test
    (``cdi.data.shift_guard.encoding_guard``); None skips it. ``draws``: the
    (published, unpublished) arrays of the further noise draws
    (``cdi.audit.noise_draws.draw_values``), which the verdict test and the
    sample-size curve average over.
    """
    from cdi.data.shift_guard import shift_guard
    from cdi.stats.sample_size import forward_sample_size, sample_size_curve

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    test = verdict_test(published.values, unpublished.values, directions=directions, config=config,
                        columns=published.columns, draws=draws)
    seconds["test_s"] = time.perf_counter() - start
    estimate = forward_sample_size(
        float(-special.ndtri_exp(min(test.ttest_log10_p * math.log(10.0), 0.0))), test.n_published,
        test.n_unpublished, alpha=config.alpha).to_dict()

    curve = None
    if config.sample_size_resamples > 0:
        start = time.perf_counter()
        raw = sample_size_curve(
            published.values, unpublished.values, directions=directions, alpha=config.alpha,
            resamples=config.sample_size_resamples, seed=config.seed, scorer=config.scorer,
            folds=config.folds, columns=published.columns,
            protocol="sequential" if config.protocol == "sequential" else "pooled", draws=draws,
        )
        curve = SampleSizeCurve(
            sizes=list(raw.sizes), median_p=list(raw.median_p), share_significant=list(raw.share_significant),
            n_needed=raw.n_needed, target_share=raw.power, resamples=raw.resamples, alpha=raw.alpha,
        )
        seconds["sample_size_curve_s"] = time.perf_counter() - start

    shift = None
    if shift_features is not None:
        start = time.perf_counter()
        feats_p, feats_u, encoder = shift_features
        guard = shift_guard(feats_p, feats_u, alpha=config.shift_alpha, seed=config.seed, encoder=encoder)
        shift = ShiftGuard(
            encoder=guard.encoder, p_value=guard.p_value, auc=guard.auc, detected=guard.detected,
            ignored=config.ignore_shift, alpha=config.shift_alpha, note=guard.note,
        )
        seconds["shift_guard_s"] = time.perf_counter() - start

    encoding = None
    if encodings is not None:
        from cdi.data.shift_guard import encoding_guard

        encoding = encoding_guard(encodings[0], encodings[1], alpha=config.shift_alpha, seed=config.seed,
                                  harmonised=encodings[2])
    blocks = encoding is not None and encoding.blocks_verdict
    verdict = decide_verdict(test.verdict, shift, ignore_shift=config.ignore_shift, encoding_blocks=blocks)
    return Analysis(verdict=verdict, test=test, curve=curve, shift=shift, seconds=seconds, estimate=estimate,
                    encoding=encoding, encoding_blocks=blocks, draws=list(draws))


def verdict_test(published: np.ndarray, unpublished: np.ndarray, *, directions: Sequence[int] | None,
                 config: AuditConfig, columns: Sequence[str], draws: Sequence[tuple[np.ndarray, np.ndarray]] = ()):
    """The audit's verdict test (``cdi.stats.verdict.audit_test``) on two value arrays (and further noise draws)."""
    from cdi.stats.verdict import audit_test

    return audit_test(
        published, unpublished, directions=directions, scorer=config.scorer, folds=config.folds,
        permutations=config.permutations, alpha=config.alpha, seed=config.seed, protocol=config.protocol,
        columns=columns, verdict=config.verdict, draws=draws,
    )


def decide_verdict(test_verdict: str, shift: ShiftGuard | None, *, ignore_shift: bool,
                   encoding_blocks: bool = False) -> str:
    """``inconclusive`` if the shift guard detected a shift, or an encoding difference that was not harmonised
    (``encoding_blocks``), unless ignored; else the test's decision word."""
    if not ignore_shift and ((shift is not None and shift.detected) or encoding_blocks):
        return "inconclusive"
    return test_verdict


def inconclusive_reason(verdict: str, shift: ShiftGuard | None, *, ignore_shift: bool,
                        encoding_blocks: bool = False) -> str | None:
    """Why an ``inconclusive`` verdict: ``"shift_guard"`` (it decides first), ``"encoding"`` (the files are
    encoded differently and were not harmonised) or ``"direction"`` (the test's rule)."""
    if verdict != "inconclusive":
        return None
    if not ignore_shift and shift is not None and shift.detected:
        return "shift_guard"
    return "encoding" if encoding_blocks and not ignore_shift else "direction"


def harmonisation_record(plan: dict[str, Any], preprocess, encoding) -> dict[str, Any]:
    """The ``harmonisation`` section of ``result.json``: what both collections went through, and why.

    ``plan`` is ``HarmonisationPlan.to_dict()`` (per-collection encodings,
    the decision and its reasons), ``preprocess`` the model's preprocessing
    as recorded in the store key (``Preprocess.record``), ``encoding`` the
    guard's encoding test; ``risk`` says in words what an unharmonised
    audit of differently encoded collections risks (None otherwise).
    """
    risk = None
    if not plan["enabled"] and (plan["wanted"] or (encoding is not None and encoding.detected)):
        risk = ("The two collections are encoded differently and were not harmonised (--no-harmonise, or feature "
                "tables extracted without it): the model saw each collection's own compression and size, which "
                "alone can make it treat them differently "
                "(in our measurements JPEG copies of images the model never saw scored as more member-like, a "
                "bias that grows with the number of images), so a `used` verdict could come from the encoding "
                "rather than from training")
    return {**plan, "preprocess": preprocess.record(), "encoding_guard": None if encoding is None else
            encoding.to_dict(), "risk": risk}


def _family_of_columns(families) -> dict[str, str]:
    from cdi.audit.reference import difference_column

    named = {column: family.name for family in families for column in family.columns()}
    return {**named, **{difference_column(c): name for c, name in named.items()}}


def build_result(
    analysis: Analysis,
    published: FeatureTable,
    unpublished: FeatureTable,
    *,
    families,
    feature_spec: str,
    directions: Sequence[int] | None,
    model: dict[str, Any],
    config: AuditConfig,
    timings: dict[str, Any],
    seed_check: Any = None,
    draws: int = 1,
    draw_calls: Any = None,
) -> AuditResult:
    """Assemble the ``AuditResult`` of an analysis.

    ``seed_check``: a ``cdi.audit.seed_check.SeedCheck``, if one ran;
    ``draws``: the noise draws the verdict averaged over
    (``cdi.audit.noise_draws``); ``draw_calls``: the ``Cost`` per image of
    one extraction of the noise-drawing families (None: not known here).
    """
    from cdi.audit.figures import NOT_RUN_UNDER_POOLED, figure_labels
    from cdi.features.registry import seed_dependence
    from cdi.stats.feature_effects import feature_effects

    test = analysis.test
    scoring = test.scoring
    n_p = len(published)
    scores, tested = scoring.scores, scoring.tested
    rows = []
    for i, table in enumerate([published, unpublished]):
        offset = 0 if i == 0 else n_p
        name = "published" if i == 0 else "unpublished"
        for j in range(len(table)):
            rows.append(ImageScore(
                path=table.paths[j], sha256=table.hashes[j], collection=name, caption=table.captions[j],
                score=float(scores[offset + j]), in_test=bool(tested[offset + j]),
            ))
    family_of = _family_of_columns(families)
    weights = [FeatureWeight(column=c, family=family_of.get(c, c), weight=float(w))
               for c, w in scoring.coefficients.items()]
    protocol = test.to_dict()
    for key in ("scores_published", "scores_unpublished", "scoring"):
        protocol.pop(key, None)
    if test.protocol == "pooled":  # no scoring model, no blocks: no field may describe them
        for key in NOT_RUN_UNDER_POOLED:
            protocol.pop(key, None)
    protocol.update(name=test.protocol, description=_protocol_description(test.protocol),
                    coefficient_kind=scoring.coefficient_kind,
                    figures=figure_labels(test.protocol, test.verdict_test, test.permutations))
    return AuditResult(
        verdict=analysis.verdict,
        inconclusive_reason=inconclusive_reason(analysis.verdict, analysis.shift, ignore_shift=config.ignore_shift,
                                                encoding_blocks=analysis.encoding_blocks),
        p_value=float(test.verdict_p),
        p_value_ttest=float(test.ttest_p),
        p_value_permutation=None if test.permutation_p is None else float(test.permutation_p),
        p_value_kind=test.verdict_choice,
        alpha=config.alpha,
        n_published=n_p,
        n_unpublished=len(unpublished),
        statistic=float(test.statistic),
        df=None if test.df is None else float(test.df),
        effect_size=float(test.effect_size),
        auc=float(test.auc),
        protocol=protocol,
        scores=rows,
        feature_weights=weights,
        sample_size_curve=analysis.curve,
        sample_size_estimate=analysis.estimate,
        shift_guard=analysis.shift,
        model=model,
        features={
            "set": feature_spec,
            "families": [{"name": f.name, "key": f.key(), "config": f.config_dict(), "columns": f.columns()}
                         for f in families],
            "columns": list(published.columns),
            "directions": None if directions is None else [int(d) for d in directions],
            "seed_dependence": seed_dependence(families, None if seed_check is None else seed_check.text()),
            "noise_draws": noise_draws_record(draws, config.seed, families, draw_calls,
                                              reliable=(test.pooled or {}).get("reliable_directions")),
        },
        parameters={k: v for k, v in asdict(config).items() if k not in ("force", "token")},
        seed=config.seed,
        command=reproduce_command(config),
        environment=environment_report(),
        timings={**timings, **analysis.seconds},
        feature_effects=feature_effects(published.values, unpublished.values, list(published.columns),
                                        directions, family_of, draws=analysis.draws),
        seed_check=None if seed_check is None else seed_check.to_dict(),
    )


def noise_draws_record(draws: int, seed: int, families, draw_calls=None, reliable: int | None = None) -> dict:
    """What ``result.json`` says of the noise draws the verdict averaged over (``cdi.audit.noise_draws``).

    ``reliable``: how many directions part 2 kept as reliable (``cdi.stats.draws``; None: not weighted).
    """
    from cdi.features.base import draw_seed

    noisy = [f.name for f in families if f.draws_noise]
    record = {"draws": int(draws), "seeds": [draw_seed(seed, r) for r in range(int(draws))] if noisy else [],
              "families": noisy}
    if draw_calls is not None and draws > 1:
        record["extra_calls_per_image"] = {"forward": draw_calls.forward * (draws - 1),
                                           "backward": draw_calls.backward * (draws - 1)}
    record["text"] = (
        "No feature family draws noise." if not noisy else
        f"The noise-drawing features ({', '.join(noisy)}) were extracted {draws} times, with independent noise "
        f"draws (seeds {', '.join(str(s) for s in record['seeds'])}); the verdict averages the pooled statistic "
        f"over the draws and standardises it by its null spread"
        + ("." if reliable is None else
           f", and, measuring from the draws how much of each measurement is noise draw rather than image (no "
           f"label used), weighs each column of part 1 by its reliability squared and keeps in part 2 the {reliable} "
           f"direction(s) in which the images carry at least half of a draw's variance.") if draws > 1 else
        f"The noise-drawing features ({', '.join(noisy)}) were extracted once, with the noise of seed {seed}.")
    return record


def _protocol_description(name: str) -> str:
    from cdi.stats import verdict

    text = verdict.PROTOCOL_DESCRIPTIONS.get(name) if hasattr(verdict, "PROTOCOL_DESCRIPTIONS") else None
    return text or (verdict.__doc__ or "").strip()
