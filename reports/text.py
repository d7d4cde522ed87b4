"""Words for the reports: names of feature families and methods for people, run settings
and provenance as labelled, rounded values, and the glossary.

Everything here turns numbers and identifiers from a result into short
plain text; the templates escape it. Exact values stay in ``result.json``,
which the report names with its SHA-256.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: Feature family (module name) -> (name for people, what it measures).
FAMILY_TEXT: dict[str, tuple[str, str]] = {
    "denoising_loss": ("Denoising error",
                       "How well the model removes noise added to the image, at several noise levels. "
                       "Training on an image makes this error smaller."),
    "secmi": ("Step consistency (SecMI)",
              "Whether one step of the model's own noising and denoising lands where it should; "
              "trained images are reproduced more consistently."),
    "pia": ("Noise-guess consistency (PIA)",
            "Whether the noise the model reads from the clean image matches the noise it finds later; "
            "closer on trained images."),
    "multiple_loss": ("Error at many noise levels",
                      "The denoising error at a range of noise levels, as a profile."),
    "noise_optimization": ("Ease of finding a matching noise",
                           "How quickly a search finds noise from which the model restores the image."),
    "gradient_masking": ("Restoring masked regions",
                         "How well the model fills in parts of the image that were hidden."),
    "clid": ("Effect of the caption (CLiD)",
             "How much better the model does with the image's caption than without it; "
             "a model that memorised image-caption pairs gains more."),
    "pfami": ("Sensitivity to small changes (PFAMI)",
              "How much the error changes when the image is slightly altered; trained images sit in a dip."),
    "gsa1": ("Training-signal size (GSA, loss)", "How strongly the image would push the model's weights."),
    "gsa2": ("Training-signal size (GSA, gradient)", "The size of the weight update the image would cause."),
    "sima": ("Score-norm dip (SimA)",
             "How small the model's predicted noise is near the clean image; smaller on trained images."),
}

#: Benchmark method -> (name for people, one-line explanation).
METHOD_TEXT: dict[str, tuple[str, str]] = {
    "loss": ("Denoising error", "Threshold on the denoising error (Matsumoto et al.)."),
    "secmi": ("SecMI", "Threshold on the error of one deterministic noising and denoising step (Duan et al., ICML 2023)."),
    "secmi++": ("SecMI at several steps", "SecMI's error at four noise levels, combined by a trained classifier."),
    "pia": ("PIA", "Proximal initialisation: compares the model's noise guess at t=0 with the one at t (Kong et al., ICLR 2024)."),
    "pian": ("PIAN", "PIA with normally distributed instead of model-derived noise."),
    "pfami": ("PFAMI", "Change of the error under small perturbations of the image (Fu et al., ICLR 2024)."),
    "gsa1": ("GSA1", "Gradient sizes of the loss, classified by a trained model (Pang et al.)."),
    "gsa2": ("GSA2", "Per-layer gradient sizes, classified by a trained model (Pang et al.)."),
    "clid_th": ("CLiD (threshold)", "Threshold on the gain the caption brings (Zhai et al., NeurIPS 2024)."),
    "clid_vec": ("CLiD (classifier)", "CLiD's gains at several noise levels, classified by a trained model."),
    "cdi": ("CDI features", "The dataset-inference feature set, scored per image by a trained model."),
    "blind": ("Blind baseline", "No model at all: a classifier on image embeddings; success means the sets differ."),
}

#: Run setting (AuditConfig field) -> label for people; fields not listed are in the raw JSON only.
SETTING_LABELS: dict[str, str] = {
    "features": "feature families",
    "alpha": "significance level (α)",
    "seed": "random seed",
    "folds": "blocks of the scoring protocol",
    "permutations": "permutations of the permutation test",
    "verdict": "p-value the verdict rests on",
    "scorer": "scoring model",
    "protocol": "test protocol",
    "sample_size_resamples": "resamples per size (sample-size curve)",
    "ignore_shift": "shift guard overridden",
    "shift_alpha": "significance level of the shift guard",
    "shift_encoder": "shift guard image representation",
    "batch_size": "images per batch",
    "device": "device",
    "dtype": "number format of the model",
    "revision": "model revision",
    "variant": "weight variant",
    "allow_pickle": "pickle weights allowed",
    "compile": "compiled model",
    "skip_bad": "unreadable files skipped",
    "store": "feature cache",
}


def family_name(name: str) -> str:
    """The name of a feature family for people (unknown families keep their identifier)."""
    return FAMILY_TEXT.get(name, (name, ""))[0]


def family_about(name: str) -> str:
    return FAMILY_TEXT.get(name, ("", ""))[1]


def method_name(name: str) -> str:
    return METHOD_TEXT.get(name, (name, ""))[0]


def method_about(name: str) -> str:
    return METHOD_TEXT.get(name, ("", ""))[1]


def rounded(value: Any) -> str:
    """A value for people: 3 significant digits for floats, yes/no for booleans, "not set" for None."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(rounded(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {rounded(v)}" for k, v in value.items()) if value else "none"
    return str(value)


def duration(seconds: Any) -> str:
    """``0.4 s``, ``2.2 s``, ``3 min 05 s``, ``1 h 04 min``."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


#: Settings of a scoring model and its blocks: they describe no step of the pooled protocol.
SCORER_SETTINGS = ("folds", "scorer")


def settings_rows(parameters: dict[str, Any], protocol: str | None = None) -> list[tuple[str, str]]:
    """(label, value) of the run settings people ask about, in a fixed order.

    Under ``protocol="pooled"`` the scoring-model settings (``SCORER_SETTINGS``)
    are left out: no scoring model is fitted and no blocks are made, so they
    would describe steps that did not run (they stay in ``result.json``'s
    parameters, which record the command line).
    """
    rows = []
    for key, label in SETTING_LABELS.items():
        if protocol == "pooled" and key in SCORER_SETTINGS:
            continue
        if key in parameters:
            value = parameters[key]
            if key == "features" and value is None:
                value = "the default set for this model"
            elif value is None:  # an option that was not given: nothing to report
                continue
            rows.append((label, rounded(value)))
    return rows


#: result.json field names that protocol texts mention, in words for the report.
FIELD_WORDS = {
    "permutation_p_interval": "the 99% interval shown beside the permutation p-value",
    "p_value_ttest": "the parametric p-value",
}


def plain_field_names(sentence: str) -> str:
    """A sentence from result.json with the field names it mentions replaced by words (``FIELD_WORDS``)."""
    for name, words in FIELD_WORDS.items():
        sentence = sentence.replace(name, words)
    return sentence


def column_label(column: str) -> str:
    """A feature column's name as the signal chart shows it (``multiple_loss_t300`` -> ``multiple loss t300``)."""
    return column.replace("_", " ")


def timing_rows(timings: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage, duration) for every ``*_s`` entry, plus the start time."""
    labels = {"load_s": "loading the model", "extract_s": "computing the features",
              "shift_embeddings_s": "describing the images for the shift guard", "test_s": "the tests",
              "sample_size_curve_s": "the sample-size curve", "shift_guard_s": "the shift guard",
              "total_s": "total"}
    rows = []
    for key, value in timings.items():
        if key.endswith("_s"):
            rows.append((labels.get(key, key[:-2].replace("_", " ")), duration(value)))
    return rows


def raw_json(data: Any) -> str:
    """Pretty JSON of a part of a result, for the benchmark report's "raw values" box."""
    return json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=True)


def tpr_resolution(n_negatives: int, fpr: float) -> str | None:
    """A warning when a TPR at FPR <= ``fpr`` cannot be resolved with ``n_negatives`` non-members.

    With n non-members the false-positive rate moves in steps of 1/n; below
    one false positive (n * fpr < 1) the bound allows none, so the figure is
    the TPR at zero false positives and says nothing about the rate itself.
    """
    if n_negatives <= 0:
        return None
    step = 1.0 / n_negatives
    if n_negatives * fpr >= 1:
        return None
    return (f"{n_negatives} non-members: the false-positive rate moves in steps of {100 * step:.2g}%, so "
            f"FPR ≤ {100 * fpr:g}% means no false positive at all; this figure cannot be resolved "
            f"(it needs at least {math.ceil(1 / fpr)} non-members).")


GLOSSARY: list[tuple[str, str]] = [
    ("Published images (P)",
     "The images the rights holder made public and suspects were used to train the model."),
    ("Unpublished images (U)",
     "Images of the same kind, from the same source, that were never made public. The model cannot have "
     "been trained on them, so they show how the model behaves on images it has not seen."),
    ("Used (“evidence of use”)",
     "The model behaves on the published images as training on them would make it behave, and the "
     "difference from the unpublished images is too large to be chance at the chosen significance level. "
     "It concerns the collection as a whole, not any single image."),
    ("Not detected",
     "No difference large enough was found. This is not proof that the images were not used."),
    ("Inconclusive",
     "No verdict was given, because the two collections already differ without the model, so a "
     "difference in the model's behaviour could come from the images rather than from training."),
    ("p-value",
     "If the published images had not been used, the probability of seeing a difference at least as "
     "large as the one measured. A small p-value (for example 0.001, one in a thousand) means the "
     "observed difference would be very unusual without use."),
    ("Significance level (α)",
     "The threshold fixed before the audit: a p-value below it counts as evidence of use. It is the "
     "largest accepted probability of a false accusation, for example 0.01 (one in a hundred)."),
    ("Features",
     "Measurements of how the model treats an image, mainly how well it removes noise added to it. "
     "Training on an image makes the model treat it better, just as a student answers questions they "
     "have seen before more easily."),
    ("Score",
     "One number per image combining its features; higher means more like an image the model was "
     "trained on. Section 8 says how it was computed in this audit."),
    ("AUC",
     "The chance that a random published image scores higher than a random unpublished one: 0.5 means "
     "no difference, 1 means every published image scores higher."),
    ("Effect size",
     "The difference between the average scores of the two collections, measured in units of their "
     "spread (0.2 small, 0.5 medium, 0.8 large)."),
    ("Shift guard",
     "A check, without the model, of whether the two collections differ in themselves (camera, style, "
     "size, compression). If they do, the audit gives no verdict."),
    ("Pooled test",
     "The verdict's test (cdi's default protocol). Every image is used once and no model is fitted to the "
     "collections. Part 1 is Student's t-test along the known member directions; part 2 is Rao's F-test along "
     "other directions; Stouffer's method combines their p-values into one."),
    ("Sequential test",
     "The test of cdi's sequential protocol: the images are dealt into blocks, each block is scored by a model "
     "fitted on earlier blocks and tested with Welch's t-test, and Stouffer's method combines the blocks."),
    ("Cross-fitted test",
     "The test of cdi's crossfit protocol: a scoring model fitted on the other folds scores each image, and "
     "the permutation test gives the p-value."),
    ("Normal scores",
     "Each measurement is replaced by its rank among all images, mapped onto a bell curve (rank-based normal "
     "scores). This is done without knowing which images are published, and makes the test robust to extreme "
     "values."),
    ("Known member directions",
     "For each measurement, the direction in which training moves it (for example, a smaller denoising error "
     "means more like a training image). The prior score is an average of the normal-scored measurements, "
     "each turned so that higher means more like a training image: with equal weights, or, when the audit drew "
     "the noise more than once, each weighted by the square of its reliability across the noise draws."),
    ("Student's t-test",
     "The classical test of whether one group's average is higher than another's: the difference of the "
     "averages divided by its standard error, compared with the t distribution."),
    ("Rao's F-test",
     "A test of whether further directions add a difference between the collections beyond the one already "
     "tested (Rao 1946): an F statistic, compared with the F distribution."),
    ("Stouffer's method",
     "Combines independent p-values: each is turned into a normal score z, the z's are added with fixed "
     "weights and divided by the square root of the sum of the squared weights; the result is again normal "
     "if the published images were not used."),
    ("Degrees of freedom",
     "How much data a t or F distribution rests on; with more images the distribution is closer to normal."),
    ("Standardised difference",
     "The difference between the averages of the two collections on one measurement, in units of its spread "
     "within the collections (Cohen's d). 0 means no difference."),
    ("95% interval",
     "The range that would contain the true value in 95 of 100 repetitions; an interval that does not "
     "include 0 shows a difference on that measurement by itself."),
    ("Permutation test",
     "The same question answered by shuffling which images count as published many times and seeing "
     "how often chance alone produces a difference as large."),
    ("SHA-256 fingerprint",
     "A 64-character code computed from a file's exact content; any change to the file changes it. It "
     "lets anyone check that the files tested are the ones they hold."),
]


#: Glossary entries that describe one protocol's test, shown only in reports of that protocol.
PROTOCOL_TERMS = {"Pooled test": "pooled", "Sequential test": "sequential", "Cross-fitted test": "crossfit"}


def glossary(protocol: str) -> list[tuple[str, str]]:
    """The glossary of a report of ``protocol``: every entry but those of the other protocols' tests."""
    return [(term, meaning) for term, meaning in GLOSSARY if PROTOCOL_TERMS.get(term, protocol) == protocol]


def glossary_terms(*terms: str) -> list[tuple[str, str]]:
    """The glossary entries whose term starts with one of ``terms``, in glossary order (for a section's box)."""
    return [(term, meaning) for term, meaning in GLOSSARY if term.startswith(terms)]
