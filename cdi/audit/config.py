"""The audit's options (``AuditConfig``), checked before anything loads, and the command that reproduces them."""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from cdi.data.collection import DEFAULT_MAX_PIXELS
from cdi.utils.errors import CDIError

SCORERS = ("logistic", "xgboost")

logger = logging.getLogger("cdi")


@dataclass
class AuditConfig:
    """Every parameter of an audit; recorded verbatim in ``result.json``."""

    published: str
    unpublished: str
    model: str
    out: str
    features: str | None = None  # None: cdi+clid+sima for conditional models, cdi+sima otherwise
    alpha: float = 0.01
    seed: int = 0
    folds: int = 5
    permutations: int | None = None  # None: cdi.stats.verdict.DEFAULT_PERMUTATIONS of the protocol
    scorer: str = "logistic"
    protocol: str = "pooled"
    verdict: str = "parametric"  # or "permutation": the exact permutation p-value is the verdict
    sample_size_resamples: int = 50
    seed_check: int = 0  # other seeds whose noise draws re-run the verdict test (cdi.audit.seed_check)
    noise_draws: int | None = None  # None: DEFAULT_NOISE_DRAWS with a model, 1 from feature tables (cdi.audit.noise_draws)
    ignore_shift: bool = False
    no_harmonise: bool = False  # feed each collection's own encoding to the model (cdi.data.harmonise)
    shift_alpha: float = 0.05  # the guard errs towards "inconclusive": a missed shift could accuse wrongly
    shift_encoder: str = "auto"
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "default"  # on CUDA the release dtype (cdi.models.loading.resolve_dtype_for)
    store: str | None = None
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    compile: bool = False
    local_files_only: bool | None = None  # None: follow HF_HUB_OFFLINE
    cache_dir: str | None = None  # None: HF_HUB_CACHE
    token: str | None = field(default=None, repr=False)  # never recorded in result.json
    skip_bad: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None
    captions: str | None = None  # None / "files": the folders' captions; "auto[:MODEL]": generated
    force: bool = False
    lora: list[str] = field(default_factory=list)  # LoRA files fused into --model (cdi.models.finetune)
    lora_scale: list[float] = field(default_factory=list)
    unet: str | None = None
    component: list[str] = field(default_factory=list)  # NAME=FOLDER replacements
    config: str | None = None  # configuration of a single-file --model
    guidance: float | None = None  # FLUX.1-dev guidance input (cdi.models.flux)
    timestep_grid: str | None = None  # flow sigma of each timestep (cdi.models.flow_matching)
    reference_model: str | None = None  # test target minus reference features (cdi.audit.reference)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. how the demo drew P and U
    published_features: str | None = None  # audit from `cdi extract` tables instead of a model
    unpublished_features: str | None = None
    ray: str | None = None  # compute on Ray: "local", "auto" or a cluster address
    ray_workers: int | None = None
    ray_threads: int = 1
    design: str | None = None  # design.json of `cdi design`: P, U and the analysis are checked against it
    allow_deviations: bool = False  # with design: list missing or extra images instead of stopping
    ledger: str | None = None  # the audit ledger file (default: beside the store, else in the parent of out)

    @property
    def draws(self) -> int:
        """The noise draws this audit extracts and tests (``noise_draws`` resolved)."""
        from cdi.audit.noise_draws import DEFAULT_NOISE_DRAWS

        if self.noise_draws is not None:
            return int(self.noise_draws)
        return 1 if self.from_features else DEFAULT_NOISE_DRAWS

    @property
    def from_features(self) -> bool:
        """Whether this audit reads stored feature tables instead of running a model."""
        return self.published_features is not None or self.unpublished_features is not None

    def validate(self) -> None:
        """Check the options that need no file access; raise ``CDIError``."""
        self._validate_sources()
        if not 0.0 < self.alpha < 0.5:
            raise CDIError(f"--alpha must be between 0 and 0.5 (got {self.alpha}); 0.01 is the usual choice")
        if not 0.0 < self.shift_alpha < 1.0:
            raise CDIError(f"--shift-alpha must be between 0 and 1 (got {self.shift_alpha})")
        if self.folds < 2:
            raise CDIError(f"--folds must be at least 2 (got {self.folds})")
        if self.permutations is not None and self.permutations < 0:
            raise CDIError(f"--permutations must be 0 (off) or positive (got {self.permutations})")
        if self.scorer not in SCORERS:
            raise CDIError(f"--scorer must be one of {', '.join(SCORERS)} (got {self.scorer!r})")
        _validate_verdict_options(self)
        if self.scorer == "xgboost":
            from cdi.utils.optional import require_xgboost

            require_xgboost("--scorer xgboost")
        from cdi.engine.batching import parse_batch_size

        parse_batch_size(self.batch_size)
        if self.sample_size_resamples < 0:
            raise CDIError("--sample-size-resamples must be 0 (off) or positive")
        check_seed(self.seed)
        _validate_seed_check(self)
        check_workers(self.workers)
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise CDIError(f"--max-pixels must be a positive whole number of pixels, got {self.max_pixels!r}")
        from cdi.models.captions import parse_captions_option

        parse_captions_option(self.captions)
        self.loading_options()
        from cdi.audit.reference import check_reference_name

        check_reference_name(self.reference_model)
        from cdi.audit.ledger import check_ledger_path

        check_ledger_path(self.ledger)
        from cdi.audit.evidence import check_out_folder

        check_out_folder(self.out, force=self.force)
        if self.out:  # the Python API without out= writes nothing (cdi.api)
            check_writable(self.out, "--out")

    def _validate_sources(self) -> None:
        """Images and a model, or two feature tables (images then optional, for the shift guard)."""
        from cdi.engine.distributed import check_ray_options

        if not self.from_features:
            if not (self.published and self.unpublished and self.model):
                raise CDIError(
                    "an audit needs --published, --unpublished and --model (or --published-features and "
                    "--unpublished-features: the feature tables of both collections made by `cdi extract`)"
                )
            check_ray_options(self.ray, self.ray_workers, self.ray_threads, self.device, self.dtype)
            return
        if not (self.published_features and self.unpublished_features):
            raise CDIError("--published-features and --unpublished-features go together: give the `cdi extract` "
                           "CSV of each collection")
        if self.model:
            raise CDIError("--model with --published-features: the model is the one the feature tables were "
                           "extracted with (recorded in them); drop --model")
        if self.ray:
            raise CDIError("--ray with --published-features: an audit from feature tables computes no feature")
        if (self.published is None) != (self.unpublished is None):
            raise CDIError("with --published-features, give both image folders (--published and --unpublished, "
                           "for the shift guard) or neither (the shift guard is then recorded as not run)")

    def loading_options(self) -> dict[str, Any]:
        """The ``load_model`` keywords for the LoRAs, replaced components and single-file config (checked)."""
        from cdi.models.finetune import loading_options
        from cdi.models.loading import flow_options

        return loading_options(self.lora, self.lora_scale, self.unet, self.component, self.config,
                               allow_pickle=self.allow_pickle) | flow_options(self.guidance, self.timestep_grid)


def check_seed(seed: int) -> None:
    """A seed must be a whole number in 0 .. 2**63 - 1 (what every random generator cdi uses accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise CDIError(f"--seed must be a whole number between 0 and 2**63 - 1, got {seed!r}")


def check_workers(workers: int | None) -> None:
    """``None`` (the default count) or a whole number of decoding processes, 0 or more."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise CDIError(f"--workers must be 0 (decode in the main process) or more, got {workers!r}")


def check_writable(path: str | Path, option: str) -> None:
    """Raise ``CDIError`` unless files can be created in folder ``path`` (or, if it does not exist yet,
    in its nearest existing parent, where it would be created).

    Tried for real, with a temporary file removed at once, because permission
    bits do not tell (root, ACLs, read-only mounts); nothing is left behind.
    """
    import tempfile

    path = Path(path).expanduser().absolute()
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CDIError(f"{option} {path}: {folder} is a file, not a folder; choose a folder path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cdi-write-test-", dir=folder)
    except OSError as exc:
        raise CDIError(f"{option} {path}: cannot write into {folder} ({exc.strerror or exc}); choose a folder you "
                       "can write to") from None
    os.close(fd)
    os.unlink(tmp)


def reproduce_command(config: AuditConfig) -> str:
    """The ``cdi audit`` command line that repeats this audit."""
    defaults = AuditConfig(config.published, config.unpublished, config.model, config.out)
    sources = ("published", "unpublished", "published_features", "unpublished_features", "model")
    parts = ["cdi", "audit"]
    for name in sources:
        if getattr(config, name) is not None:
            parts += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    parts += ["--out", config.out]
    for name, value in asdict(config).items():
        if name in {*sources, "out", "extra", "force", "token"}:
            continue
        if value == getattr(defaults, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _validate_seed_check(config: "AuditConfig") -> None:
    """``--seed-check K`` and ``--noise-draws R`` > 1 re-extract features, so they need the model."""
    from cdi.audit.noise_draws import check_noise_draws
    from cdi.audit.seed_check import check_seed_check

    check_seed_check(config.seed_check)
    check_noise_draws(config.noise_draws)
    if config.from_features and config.draws > 1:
        raise CDIError("--noise-draws above 1 re-extracts the noise-drawing features, which needs the images and "
                       "the model; the `cdi extract` tables hold one draw: drop --noise-draws, or audit from the "
                       "images (--published, --unpublished, --model)")
    if config.seed_check and config.from_features:
        raise CDIError("--seed-check re-extracts the noise-drawing features with other seeds, which needs the "
                       "images and the model; an audit from feature tables cannot run it: drop --seed-check, or "
                       "audit from the images (--published, --unpublished, --model)")


def _validate_verdict_options(config: "AuditConfig") -> None:
    """The protocol, verdict, scorer and permutation options fit together (``CDIError`` if not)."""
    from cdi.stats.verdict import PROTOCOLS, VERDICTS

    if config.protocol not in PROTOCOLS:
        raise CDIError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {config.protocol!r})")
    if config.verdict not in VERDICTS:
        raise CDIError(f"--verdict must be one of {', '.join(VERDICTS)} (got {config.verdict!r})")
    if (config.verdict == "permutation" or config.protocol == "crossfit") and config.permutations == 0:
        raise CDIError("--verdict permutation needs permutations: pass --permutations (e.g. 10000), not 0")
    if config.protocol == "pooled" and config.scorer != "logistic":
        raise CDIError(f"--scorer {config.scorer} applies to the sequential and crossfit protocols only; "
                       "the default pooled protocol learns no scorer")
