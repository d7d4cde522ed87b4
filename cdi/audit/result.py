"""The audit's result: one dataclass, written as ``result.json``.

``result.json`` is the evidence record. Together with the feature table
written beside it (``features.csv`` + ``features.csv.json``) it holds
everything needed to re-test, re-plot and re-render the report without the
model. Its layout is versioned by ``SCHEMA_VERSION``; readers refuse a newer
major version with a clear message.

Two runs with the same inputs and seed produce identical files apart from
the ``timings`` section (wall-clock times and the start timestamp) and the
``ledger`` section (the audit ledger grows with every audit, ``cdi.audit.ledger``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cdi.audit.folder import FEATURES_FILE, REPORT_FILE, RESULT_FILE, resolve  # file names re-exported here
from cdi.utils.errors import CDIError
from cdi.utils.io import atomic_write_bytes

SCHEMA_VERSION = 1

Verdict = Literal["used", "not_detected", "inconclusive"]

VERDICT_TEXT = {
    "used": (
        "The model behaves measurably differently on the published images than on comparable "
        "unpublished ones, in the way training on them would cause. The test rejects, at the "
        "chosen significance level, the hypothesis that the published images were not used."
    ),
    "not_detected": (
        "No evidence of use was found at the chosen significance level. This is not proof that "
        "the images were not used: the model may have seen them too little to leave a detectable "
        "trace, or more images may be needed (see the sample-size curve)."
    ),
    "inconclusive": (
        "The published and unpublished images differ from each other even without looking at the "
        "model (the shift guard detected a difference in distribution), so a difference in the "
        "model's behaviour could come from the images themselves rather than from training. "
        "Collect unpublished images that match the published ones more closely."
    ),
}

#: The verdict text of an ``inconclusive`` verdict given by the direction rule (``cdi.stats.verdict.direction_rule``).
INCONCLUSIVE_DIRECTION_TEXT = (
    "The model treats the two collections differently, but not in the way training on the published images "
    "would cause, so the difference cannot be read as evidence of training (the collections are not comparable). "
    "Collect unpublished images that match the published ones more closely (same source, processing and file "
    "format)."
)


@dataclass
class ImageScore:
    """One image's row in the manifest."""

    path: str
    sha256: str
    collection: Literal["published", "unpublished"]
    caption: str | None
    score: float
    in_test: bool  # whether this image's score entered the verdict's test statistic


@dataclass
class FeatureWeight:
    """How much a feature column carried the scoring model (standardised units)."""

    column: str
    family: str
    weight: float


@dataclass
class SampleSizeCurve:
    """p-values of the verdict test on resampled subsets of increasing size."""

    sizes: list[int]  # images per collection in each subset
    median_p: list[float]
    share_significant: list[float]  # share of subsets with p < alpha
    n_needed: int | None  # smallest size with share >= target_share, None if never
    target_share: float
    resamples: int
    alpha: float
    meaning: str = ("robustness to leaving images out: subsets of this audit's own images, not the images "
                    "another audit would need (see sample_size_estimate)")


@dataclass
class ShiftGuard:
    """The model-free test of whether P and U differ in distribution."""

    encoder: str  # which image representation was used
    p_value: float
    auc: float
    detected: bool
    ignored: bool  # --ignore-shift was given
    alpha: float
    note: str = ""


@dataclass
class AuditResult:
    """Everything an audit concluded and everything needed to reproduce it."""

    verdict: Verdict
    p_value: float  # the verdict's p-value
    p_value_ttest: float
    p_value_permutation: float | None
    alpha: float
    n_published: int
    n_unpublished: int
    statistic: float  # Welch t of the verdict test
    df: float
    effect_size: float  # Hedges' g of published vs unpublished verdict scores
    auc: float  # AUC of published vs unpublished verdict scores
    protocol: dict[str, Any]  # name, description and parameters of the test protocol
    scores: list[ImageScore]
    feature_weights: list[FeatureWeight]
    sample_size_curve: SampleSizeCurve | None
    shift_guard: ShiftGuard | None
    model: dict[str, Any]  # adapter.describe(): id, revision, fingerprint, family, dtype, device
    features: dict[str, Any]  # feature set, families with their configs, columns, directions
    parameters: dict[str, Any]  # every parameter of the run
    seed: int
    command: str  # the command line that reproduces the run
    environment: dict[str, Any]  # tool and package versions, python, platform
    timings: dict[str, Any] = field(default_factory=dict)  # seconds per stage, start time
    # estimated images another audit would need for 90% power (cdi.stats.sample_size.ForwardSampleSize)
    sample_size_estimate: dict[str, Any] | None = None
    feature_table: str = FEATURES_FILE
    schema_version: int = SCHEMA_VERSION
    # How the features were computed: batch_size (the one actually used), batch_size_rule, final_batch_size.
    extraction: dict[str, Any] = field(default_factory=dict)
    # {file name: SHA-256} of the other evidence files written with this result (cdi.audit.evidence).
    evidence_files: dict[str, str] = field(default_factory=dict)
    # every file seen in P and U and what happened to it, near-duplicate pairs (cdi.audit.run.input_record)
    inputs: dict[str, Any] | None = None
    # where the captions came from: files or a captioner (id, fingerprint), what was missing (cdi.models.captions)
    captions: dict[str, Any] | None = None
    #: "used" (was P used to train the model?) or "used_beyond_reference" (features are target minus
    #: reference model, cdi.audit.reference: was P used beyond the reference, e.g. in a LoRA on top of it?).
    question: str = "used"
    reference_model: dict[str, Any] | None = None  # the reference's describe(), when one was used
    #: why the verdict is inconclusive: "shift_guard" or "direction" (cdi.stats.verdict.direction_rule); None otherwise
    inconclusive_reason: str | None = None
    #: which p-value ``p_value`` is: "parametric" (the protocol's test) or "permutation" (exact); the other is
    #: p_value_ttest / p_value_permutation
    p_value_kind: str = "parametric"
    # the pre-registered design the audit followed and how P and U matched it (cdi.audit.design.audit_record)
    design: dict[str, Any] | None = None
    # this audit's line in the audit ledger and the other audits of the same collections (cdi.audit.ledger)
    ledger: dict[str, Any] | None = None
    # what both collections went through before the model (cdi.data.harmonise) and the encoding guard
    harmonisation: dict[str, Any] | None = None
    # per-feature standardised differences (95% intervals) and per-family contributions to the pooled test's
    # prior part (cdi.stats.feature_effects): what the report's signal chart draws; descriptive, not the verdict
    feature_effects: dict[str, Any] | None = None
    # the verdict test re-run with other seeds' noise draws (cdi.audit.seed_check.SeedCheck); None: not run
    seed_check: dict[str, Any] | None = None

    @property
    def verdict_text(self) -> str:
        if self.question == "used_beyond_reference" and self.reference_model:
            name = self.reference_model.get("model_id", "the reference model")
            return (f"Question answered: were the published images used in training beyond the reference model "
                    f"{name} (for example in a fine-tune or LoRA on top of it)? Every feature is the difference "
                    f"between the audited model and the reference on the same image and noise. "
                    + self._plain_verdict_text())
        return self._plain_verdict_text()

    def _plain_verdict_text(self) -> str:
        if self.verdict == "inconclusive" and self.inconclusive_reason == "direction":
            return INCONCLUSIVE_DIRECTION_TEXT
        return VERDICT_TEXT[self.verdict]

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict_text"] = self.verdict_text
        return _finite_or_none(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False)

    def to_bytes(self) -> bytes:
        """The exact bytes of ``result.json`` (what ``save`` writes and what its SHA-256 is taken of)."""
        return (self.to_json() + "\n").encode("utf-8")

    def save(self, folder: str | Path) -> Path:
        """Write ``result.json`` into ``folder`` atomically."""
        path = Path(folder) / RESULT_FILE
        atomic_write_bytes(path, self.to_bytes())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditResult":
        version = data.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise CDIError(
                f"result.json has schema version {version!r}, but this cdi reads versions up to "
                f"{SCHEMA_VERSION}; upgrade cdi to read it"
            )
        data = dict(data)
        data.pop("verdict_text", None)
        data["scores"] = [ImageScore(**s) for s in data["scores"]]
        data["feature_weights"] = [FeatureWeight(**w) for w in data["feature_weights"]]
        if data.get("sample_size_curve") is not None:
            data["sample_size_curve"] = SampleSizeCurve(**data["sample_size_curve"])
        if data.get("shift_guard") is not None:
            data["shift_guard"] = ShiftGuard(**data["shift_guard"])
        return cls(**data)

    @classmethod
    def load(cls, folder: str | Path) -> "AuditResult":
        """Read ``result.json`` from an audit folder (or the file itself).

        In a folder whose last write was interrupted after its commit point,
        the committed new result is read (``cdi.audit.folder.resolve``).
        """
        path = Path(folder)
        if path.is_dir():
            path = resolve(path)[RESULT_FILE]
        if not path.is_file():
            raise CDIError(f"no audit result at {path}: pass the folder an audit wrote with --out")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CDIError(f"cannot read {path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise CDIError(f"{path} is not a valid cdi audit result ({exc})") from None


def _finite_or_none(value: Any) -> Any:
    """Replace NaN and infinities by None so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value

