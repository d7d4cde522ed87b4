"""``cdi benchmark``: single-image membership inference attacks under CopyMark's protocol, beside the audit.

What a run does, in order:

1. **Data.** Members and non-members come from ``--members``/``--nonmembers``
   or from a named setup (``cdi/setups/<name>.json``, shipped in the
   package and linked as ``examples/setups``). The real setups (CopyMark's
   (a)-(e) and SD 1.5 on LAION-MI) document the model alias and how to
   obtain and lay out the images; they need downloads and a GPU, so
   ``--setup`` only checks that their folders exist under ``$CDI_DATA``
   (default ``./data``) and says how to get them when not. The toy setups
   build a local toy world (``cdi.toy.world.build_world``). ``quick`` draws a
   seeded subset of ``QUICK_SIZE`` images of each class.
2. **Split.** ``attacks.protocol.split_calibration_test``: seeded, balanced,
   ``calibration_fraction`` of each class for calibration.
3. **Features.** Every feature family the chosen methods need, plus the CDI
   set (the audit needs it), extracted family by family through one feature
   store (default ``<out>/features.sqlite``), so reruns read instead of
   compute. The blind baseline and the shift measures use model-free image
   embeddings (``cdi.data.shift_guard.image_embeddings``).
4. **Methods.** ``attacks.protocol.evaluate`` per method: calibration ROC,
   TPR at FPR <= 1% and 0.1%, AUC (out-of-fold for trained methods), the
   calibration thresholds applied unchanged to the test split, bootstrap
   intervals. Cost: the model calls per image of its families
   (``FeatureFamily.cost``) and the seconds per image measured in this run
   (near zero when the store already held the values).
5. **Shift.** ``attacks.shift.measure_shift`` between all used members and
   non-members.
6. **Audit.** ``cdi.audit.analysis.analyse_tables`` with P = test-split members and
   U = test-split non-members on the CDI features, with the shift guard:
   the set-level answer beside the per-image attacks.
7. **Mixing** (optional). For each fraction f of ``mix``, the non-members
   are replaced by a copy in which a share f of the images is shifted
   (``cdi.toy.world.write_shifted_images``, seeded); the Frechet distance to the
   members and every method's calibration AUC and TPR@1%FPR are recorded.
   It shows how much of an attack's apparent success is dataset shift.

Outputs in ``out``: ``benchmark.json`` (everything above, with every score
so curves can be redrawn) and ``benchmark.html`` (self-contained: CopyMark
Table 5 layout, log-log ROC plots as inline SVG, the shift, the audit and the
mixing table and plot).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdi.utils.errors import CDIError
from cdi.utils.io import atomic_write_text
from cdi.utils.optional import XGBOOST_METHODS, require_xgboost

BENCHMARK_FILE = "benchmark.json"
REPORT_FILE = "benchmark.html"
SETUPS_DIR = Path(__file__).resolve().parent / "setups"  # also reachable as examples/setups (a link)
#: Images of each class used with ``quick``.
QUICK_SIZE = 60
#: The methods of ``attacks.scorers`` in the order of the report.
ALL_METHODS = ("loss", "secmi", "secmi++", "pia", "pian", "sima", "pfami", "gsa1", "gsa2", "clid_th",
               "clid_vec", "cdi", "blind")
#: The cheap subset run with ``quick`` unless methods are given.
QUICK_METHODS = ("loss", "secmi", "pia", "pian", "clid_th", "blind", "cdi")
#: Bootstrap resamples per method and fraction in the mixing experiment (only point figures are reported).
MIX_BOOTSTRAP = 100
#: SecMI++'s timesteps: SecMI_stat at each (DDIM interval 10), columns ``secmi_t<t>``. REFERENCE.md says
#: "several t" without a list; these four around SecMI's default t = 100 are this toolkit's choice.
SECMI_PLUS_TIMESTEPS = (50, 100, 150, 200)
#: Feature families each method reads, by label: a ``features.registry`` family name, "cdi" for the CDI
#: set, or ``secmi_t<t>`` for SecMI_stat at timestep t; "blind" reads image embeddings instead.
METHOD_FAMILIES: dict[str, tuple[str, ...]] = {
    "loss": ("denoising_loss",), "secmi": ("secmi",),
    "secmi++": tuple(f"secmi_t{t:03d}" for t in SECMI_PLUS_TIMESTEPS), "pia": ("pia",),
    "pian": ("pia",), "sima": ("sima",), "pfami": ("pfami",), "gsa1": ("gsa1",), "gsa2": ("gsa2",), "clid_th": ("clid",),
    "clid_vec": ("clid",), "cdi": ("cdi",), "blind": (),
}
#: With ``quick``, the expensive families run with fewer model calls (recorded in benchmark.json):
#: PFAMI 2 neighbours at 2 timesteps (12 forward calls instead of 110), GSA at 2 timesteps (instead of 20).
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "pfami": {"neighbours": 2, "timesteps": (100, 300)},
    "gsa1": {"timesteps": (100, 500)},
    "gsa2": {"timesteps": (100, 500)},
}


# ----------------------------------------------------------------------------- setups
@dataclass(frozen=True)
class Setup:
    """A named benchmark setup (one file of ``examples/setups``).

    A real setup names ``model``, ``members`` and ``nonmembers`` (paths under
    the data root) and documents how to obtain them; a toy setup has ``toy``
    = ``{"kind", "strength", "nonmembers"}`` (the world's non-member folder).
    """

    name: str
    source: str
    how_to_obtain: str
    layout: str
    model: str | None = None
    members: str | None = None
    nonmembers: str | None = None
    needs: str | None = None
    toy: dict | None = None


def available_setups() -> list[str]:
    """Names of the setups shipped in ``examples/setups``."""
    return sorted(p.stem for p in SETUPS_DIR.glob("*.json"))


def load_setup(name: str) -> Setup:
    """Read ``examples/setups/<name>.json``; a ``CDIError`` lists the known names if there is none."""
    path = SETUPS_DIR / f"{name}.json"
    if "/" in name or "\\" in name or not path.is_file():
        raise CDIError(f"unknown setup {name!r}; choose one of: {', '.join(available_setups())}")
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        return Setup(**data)
    except TypeError as exc:
        raise CDIError(f"setup file {path} is malformed ({exc})") from None


def data_root() -> Path:
    """Where real setups' folders live: ``$CDI_DATA``, else ``./data``."""
    return Path(os.environ.get("CDI_DATA") or "data").expanduser()


def resolve_setup(setup: Setup, *, seed: int = 0, progress: bool = True) -> tuple[str, str, str, str]:
    """(members folder, non-members folder, model, unshifted non-members folder) of a setup.

    Builds (or reuses) a toy world; checks that a real setup's folders exist.
    The last folder is the source of the mixing experiment's shifted copies:
    a toy world's unshifted non-members, else the non-members themselves.
    """
    if setup.toy is not None:
        from cdi.toy.world import build_world

        world = build_world(setup.toy["kind"], setup.toy["strength"], seed=seed, progress=progress)
        return (str(world.members_dir), str(world.root / setup.toy["nonmembers"]), str(world.model_dir),
                str(world.nonmembers_dir))
    root = data_root()
    missing = [str(root / p) for p in (setup.members, setup.nonmembers) if not (root / p).is_dir()]
    if missing:
        raise CDIError(
            f"setup {setup.name!r} ({setup.source}) needs its images, which are not here: missing "
            f"{', '.join(missing)}. How to get them: {setup.how_to_obtain} Layout: {setup.layout} "
            f"Put them under $CDI_DATA (now {root}) or pass --members, --nonmembers and --model "
            f"{setup.model}. It needs: {setup.needs}"
        )
    return str(root / setup.members), str(root / setup.nonmembers), str(setup.model), str(root / setup.nonmembers)


# ----------------------------------------------------------------------------- config
@dataclass
class BenchmarkConfig:
    """Every parameter of a benchmark run; recorded in ``benchmark.json``."""

    out: str
    setup: str | None = None
    members: str | None = None
    nonmembers: str | None = None
    model: str | None = None
    methods: str | None = None  # None: all (QUICK_METHODS with quick)
    calibration_fraction: float = 0.5
    quick: bool = False
    seed: int = 0
    batch_size: int | str = "auto"  # resolved to the number used before extraction
    device: str = "auto"
    dtype: str = "default"  # the release dtype on CUDA, float32 elsewhere (cdi.models.loading.resolve_dtype_for)
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    compile: bool = False
    local_files_only: bool | None = None  # None: follow HF_HUB_OFFLINE
    cache_dir: str | None = None
    token: str | None = field(default=None, repr=False)  # never written to benchmark.json
    alpha: float = 0.01  # significance level of the audit beside the attacks
    store: str | None = None  # None: <out>/features.sqlite
    mix: str | None = None  # e.g. "0,0.25,0.5,0.75,1"
    folds: int = 5
    n_bootstrap: int = 1000
    permutations: int = 1000
    shift_encoder: str = "auto"
    lora: list[str] = field(default_factory=list)  # LoRA files fused into --model (cdi.models.finetune)
    lora_scale: list[float] = field(default_factory=list)
    unet: str | None = None
    component: list[str] = field(default_factory=list)  # NAME=FOLDER replacements
    config: str | None = None  # configuration of a single-file --model
    guidance: float | None = None  # FLUX.1-dev guidance input (cdi.models.flux)
    timestep_grid: str | None = None  # flow sigma of each timestep (cdi.models.flow_matching)
    reference_model: str | None = None  # every feature becomes target minus reference (cdi.audit.reference)

    def method_list(self) -> list[str]:
        """The methods to run, validated."""
        if self.methods is None:
            return list(QUICK_METHODS if self.quick else ALL_METHODS)
        names = [m.strip().lower() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHOD_FAMILIES]
        if unknown or not names:
            raise CDIError(f"unknown method(s) {unknown or self.methods!r}; choose from {', '.join(ALL_METHODS)}")
        return list(dict.fromkeys(names))

    def mix_fractions(self) -> list[float]:
        """The mixing fractions, validated (empty: no mixing experiment)."""
        if not self.mix:
            return []
        try:
            fractions = [float(f) for f in self.mix.split(",") if f.strip()]
        except ValueError:
            raise CDIError(f"--mix must be comma-separated numbers between 0 and 1, got {self.mix!r}") from None
        if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
            raise CDIError(f"--mix must be comma-separated numbers between 0 and 1, got {self.mix!r}")
        return sorted(set(fractions))

    def validate(self) -> None:
        """Check the options that need no file access; raise ``CDIError``."""
        if (self.setup is None) == (self.members is None and self.nonmembers is None and self.model is None):
            raise CDIError("give either --setup NAME or all of --members DIR --nonmembers DIR --model M")
        if self.setup is None and None in (self.members, self.nonmembers, self.model):
            raise CDIError("--members, --nonmembers and --model go together; give all three (or --setup)")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise CDIError(f"--calibration-fraction must lie strictly between 0 and 1, got {self.calibration_fraction}")
        if self.folds < 2:
            raise CDIError(f"--folds must be at least 2 (got {self.folds})")
        if not 0.0 < self.alpha < 0.5:
            raise CDIError(f"--alpha must be between 0 and 0.5 (got {self.alpha}); 0.01 is the usual choice")
        from cdi.engine.batching import parse_batch_size

        parse_batch_size(self.batch_size)
        needs_xgboost = [m for m in self.method_list() if m in XGBOOST_METHODS]
        if needs_xgboost:
            require_xgboost(f"the method(s) {', '.join(needs_xgboost)} (leave them out with --methods)")
        if self.mix_fractions() and self.reference_model:
            raise CDIError("--mix and --reference-model cannot be combined yet; run the mixing experiment without "
                           "the reference")
        self.loading_options()
        from cdi.audit.reference import check_reference_name

        check_reference_name(self.reference_model)
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise CDIError(f"--out {out} exists and is not a folder; choose a folder for the benchmark's files")

    def loading_options(self) -> dict[str, Any]:
        """The ``load_model`` keywords for the LoRAs, replaced components and single-file config (checked)."""
        from cdi.models.finetune import loading_options
        from cdi.models.loading import flow_options

        return loading_options(self.lora, self.lora_scale, self.unet, self.component, self.config,
                               allow_pickle=self.allow_pickle) | flow_options(self.guidance, self.timestep_grid)


# ----------------------------------------------------------------------------- running
def _make_family(label: str, quick: bool):
    from cdi.features.registry import FAMILIES
    from cdi.features.secmi import SecMI

    if label.startswith("secmi_t"):
        return SecMI(timestep=int(label[len("secmi_t"):]))
    return FAMILIES[label](**(QUICK_OVERRIDES.get(label, {}) if quick else {}))


def _families_for(methods: Sequence[str], quick: bool) -> dict[str, Any]:
    """label -> feature family for everything ``methods`` need plus the CDI set, each once."""
    from cdi.features.registry import FEATURE_SETS

    labels: list[str] = []
    for method in list(methods) + ["cdi"]:
        for family in METHOD_FAMILIES[method]:
            labels.extend(n for n in (FEATURE_SETS.get(family) or [family]) if n not in labels)
    return {label: _make_family(label, quick) for label in labels}


def _draw(n: int, size: int | None, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if size is None or n <= size else np.sort(rng.choice(n, size=size, replace=False))


@dataclass
class _Data:
    """The images used, their features per family, and the embeddings."""

    tables: dict[str, Any]  # family label -> (member FeatureTable, non-member FeatureTable)
    seconds: dict[str, float]  # family label -> seconds per image this run
    embeddings: tuple[np.ndarray, np.ndarray]
    embedding_seconds: float
    encoder: str


def _extract(adapter, members, nonmembers, families, config: BenchmarkConfig, store, progress: bool,
             encoder: str, reference=None) -> _Data:
    """Features of both collections per family; with a ``reference`` model, target minus reference."""
    from cdi.audit.reference import calibrate
    from cdi.data.shift_guard import image_embeddings
    from cdi.features.extract import extract_features

    tables, seconds = {}, {}
    n = len(members) + len(nonmembers)
    for label, family in families.items():
        start = time.perf_counter()
        pair = [extract_features(adapter, c, [family], seed=config.seed, batch_size=config.batch_size,
                                 store=store, progress=progress) for c in (members, nonmembers)]
        if reference is not None:
            pair = calibrate(pair, [extract_features(reference, c, [family], seed=config.seed,
                                                     batch_size=config.batch_size, store=store, progress=progress)
                                    for c in (members, nonmembers)])
        if label != family.name:  # SecMI at another timestep: one column, named by its label
            for table in pair:
                table.columns = [label]
        tables[label] = tuple(pair)
        seconds[label] = (time.perf_counter() - start) / n
    start = time.perf_counter()
    emb_m, used = image_embeddings(members, encoder=encoder)
    emb_n, _ = image_embeddings(nonmembers, encoder=used)
    return _Data(tables, seconds, (emb_m, emb_n), (time.perf_counter() - start) / n, used)


def _matrix(data: _Data, families: Sequence[str], which: int) -> tuple[np.ndarray, list[str]]:
    tables = [data.tables[f][which] for f in families]
    return np.column_stack([t.values for t in tables]), [c for t in tables for c in t.columns]


def _method_inputs(method: str, data: _Data, cdi_families: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Member and non-member feature matrices of ``method`` and their column names."""
    from cdi.attacks.blind import embedding_columns

    if method == "blind":
        emb_m, emb_n = data.embeddings
        return emb_m, emb_n, embedding_columns(emb_m.shape[1])
    families = cdi_families if method == "cdi" else list(METHOD_FAMILIES[method])
    x_m, columns = _matrix(data, families, 0)
    x_n, _ = _matrix(data, families, 1)
    return x_m, x_n, columns


def _method_cost(method: str, data: _Data, families: dict, cdi_families: list[str], adapter) -> dict:
    if method == "blind":
        return {"forward": 0, "backward": 0, "seconds": data.embedding_seconds}
    names = cdi_families if method == "cdi" else list(METHOD_FAMILIES[method])
    forward = sum(families[n].cost(adapter).forward for n in names)
    backward = sum(families[n].cost(adapter).backward for n in names)
    return {"forward": int(forward), "backward": int(backward), "seconds": float(sum(data.seconds[n] for n in names))}


def _evaluate_methods(methods, data: _Data, split, config: BenchmarkConfig, cdi_families, costs=None,
                      n_bootstrap: int | None = None) -> dict[str, Any]:
    from cdi.attacks.protocol import evaluate
    from cdi.attacks.scorers import make_scorer

    results = {}
    for method in methods:
        x_m, x_n, columns = _method_inputs(method, data, cdi_families)
        x_cal, y_cal, x_test, y_test = split.apply(x_m, x_n)
        scorer = make_scorer(method, seed=config.seed, columns=columns if method in ("cdi", "blind") else None)
        results[method] = evaluate(
            scorer, x_cal, y_cal, x_test, y_test, columns=columns, folds=config.folds,
            n_bootstrap=config.n_bootstrap if n_bootstrap is None else n_bootstrap, seed=config.seed,
            cost=None if costs is None else costs[method],
        )
    return results


def _audit(data: _Data, split, config: BenchmarkConfig, cdi_families, families, adapter, paths) -> dict:
    """The CDI audit with P = test-split members, U = test-split non-members."""
    from cdi.audit.config import AuditConfig
    from cdi.audit.analysis import analyse_tables
    from cdi.engine.table import FeatureTable
    from cdi.features.registry import directions_of

    def table(which: int, rows: np.ndarray) -> FeatureTable:
        x, columns = _matrix(data, cdi_families, which)
        first = data.tables[cdi_families[0]][which]
        return FeatureTable(first.paths, first.hashes, first.captions, columns, x).subset(rows)

    p, u = table(0, split.test_members), table(1, split.test_nonmembers)
    needed = config.folds * config.folds  # the sequential protocol's blocks need `folds` images of each class
    if min(len(p), len(u)) < needed:
        return {"verdict": None, "p_value": None, "n_published": len(p), "n_unpublished": len(u),
                "skipped": f"the test split holds {len(p)} members and {len(u)} non-members; the audit with "
                           f"{config.folds} folds needs at least {needed} of each (use more images or fewer folds)"}
    directions = directions_of([families[n] for n in cdi_families], adapter)
    audit_config = AuditConfig(published=paths[0], unpublished=paths[1], model=paths[2], out=config.out,
                               seed=config.seed, folds=config.folds, permutations=config.permutations, alpha=config.alpha,
                               sample_size_resamples=0, shift_encoder=data.encoder)
    emb_m, emb_n = data.embeddings
    analysis = analyse_tables(p, u, directions=directions, config=audit_config,
                              shift_features=(emb_m[split.test_members], emb_n[split.test_nonmembers], data.encoder))
    return {
        "verdict": analysis.verdict,
        "p_value": float(analysis.test.verdict_p),
        "alpha": audit_config.alpha,
        "n_published": len(p),
        "n_unpublished": len(u),
        "features": "cdi",
        "shift_guard": None if analysis.shift is None else asdict(analysis.shift),
        "note": "P = test-split members, U = test-split non-members; the audit's own shift guard is applied",
    }


def _mixing(fractions, members, nonmembers_dir: str, used_nonmembers, adapter, families, methods, split,
            config: BenchmarkConfig, store, progress: bool, encoder: str, cdi_families) -> list[dict]:
    """Frechet distance and each method's calibration AUC and TPR@1%FPR per shifted share of non-members.

    The non-members used are replaced, file name for file name, by the images
    of a copy of ``nonmembers_dir`` in which a share ``fraction`` is shifted
    (``cdi.toy.world.write_shifted_images`` with the run's seed), so the split and
    the members stay the same and only the shift changes.
    """
    from cdi.toy.data import write_shifted_images

    rows = []
    wanted = [r.path for r in used_nonmembers.records]
    for fraction in fractions:
        # The shifted copy is rebuilt every run (cheap next to the features, which the store keeps by
        # image hash), so a copy left from another run can never be read by mistake.
        with tempfile.TemporaryDirectory(dir=config.out, prefix=".mix-") as scratch:
            folder = Path(scratch) / f"shifted-{fraction:g}"
            write_shifted_images(nonmembers_dir, folder, fraction=fraction, seed=config.seed)
            rows.append(_mixing_row(fraction, folder, wanted, members, adapter, families, methods, split, config,
                                    store, progress, encoder, cdi_families))
    return rows


def _mixing_row(fraction, folder, wanted, members, adapter, families, methods, split, config, store, progress,
                encoder, cdi_families) -> dict:
    """One row of the mixing experiment: the used non-members taken from the shifted copy ``folder``."""
    from cdi.attacks.shift import measure_shift
    from cdi.data.collection import ImageCollection

    mixed = ImageCollection.from_folder(folder, name=f"non-members with {fraction:g} shifted")
    index = {r.path: i for i, r in enumerate(mixed.records)}
    missing = [p for p in wanted if p not in index]
    if missing:
        raise CDIError(f"the mixing experiment needs a flat non-member folder; {missing[:3]} are not in "
                       f"{folder} (shifted copies cover the top level only)")
    mixed = mixed.subset([index[p] for p in wanted])
    data = _extract(adapter, members, mixed, families, config, store, progress, encoder)
    shift = measure_shift(*data.embeddings, encoder=data.encoder, seed=config.seed)
    results = _evaluate_methods(methods, data, split, config, cdi_families, n_bootstrap=MIX_BOOTSTRAP)
    return {
        "fraction": fraction,
        "frechet": shift.frechet,
        "methods": {m: {"auc": r.calibration["auc"], "tpr_at_1fpr": r.calibration["tpr_at_1fpr"]}
                    for m, r in results.items()},
    }


def run_benchmark(config: BenchmarkConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark and write ``benchmark.json`` and ``benchmark.html`` into ``config.out``.

    Returns the content of ``benchmark.json``.
    """
    from cdi.attacks.protocol import split_calibration_test
    from cdi.attacks.shift import measure_shift
    from cdi.data.collection import ImageCollection
    from cdi.utils.environment import environment_report
    from cdi.models import load_model

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    config.validate()
    methods = config.method_list()
    fractions = config.mix_fractions()
    setup = load_setup(config.setup) if config.setup else None
    if setup is not None:
        members_dir, nonmembers_dir, model, mix_source = resolve_setup(setup, seed=config.seed, progress=progress)
    else:
        members_dir, nonmembers_dir, model = config.members, config.nonmembers, config.model
        mix_source = nonmembers_dir
    members = ImageCollection.from_folder(members_dir, name="members")
    nonmembers = ImageCollection.from_folder(nonmembers_dir, name="non-members")
    rng = np.random.default_rng(config.seed)
    size = QUICK_SIZE if config.quick else None
    members = members.subset(_draw(len(members), size, rng).tolist())
    nonmembers = nonmembers.subset(_draw(len(nonmembers), size, rng).tolist())
    split = split_calibration_test(len(members), len(nonmembers), calibration_fraction=config.calibration_fraction,
                                   seed=config.seed)

    hub = dict(local_files_only=config.local_files_only, cache_dir=config.cache_dir, token=config.token)
    adapter = load_model(model, dtype=config.dtype, device=config.device, revision=config.revision,
                         variant=config.variant, allow_pickle=config.allow_pickle, compile=config.compile,
                         **config.loading_options(), **hub)
    reference = None
    if config.reference_model:
        from cdi.audit.reference import check_reference

        reference = load_model(config.reference_model, dtype=config.dtype, device=config.device,
                               allow_pickle=config.allow_pickle, **hub)
        check_reference(adapter, reference)
    families = _families_for(methods, config.quick)
    for family in families.values():
        family.check_applicable(adapter)
    from cdi.engine.batching import resolve_batch_size
    from cdi.features.registry import FEATURE_SETS

    config = replace(config, batch_size=resolve_batch_size(config.batch_size, adapter, list(families.values()),
                                                           members.records[0].caption if len(members) else None))

    cdi_families = list(FEATURE_SETS["cdi"])
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = config.store or str(out / "features.sqlite")

    data = _extract(adapter, members, nonmembers, families, config, store_path, progress, config.shift_encoder,
                    reference)
    costs = {m: _method_cost(m, data, families, cdi_families, adapter) for m in methods}
    results = _evaluate_methods(methods, data, split, config, cdi_families, costs)
    shift = measure_shift(*data.embeddings, encoder=data.encoder, seed=config.seed)
    audit = _audit(data, split, config, cdi_families, families, adapter,
                   (members_dir, nonmembers_dir, model))
    mixing = []
    if fractions:
        mixing = _mixing(fractions, members, mix_source, nonmembers, adapter, families, methods, split,
                         config, store_path, progress, data.encoder, cdi_families)

    result = {
        "kind": "cdi.benchmark",
        "started_at": started,
        "config": {k: v for k, v in asdict(config).items() if k != "token"},
        "setup": None if setup is None else asdict(setup),
        "data": {"members": members_dir, "nonmembers": nonmembers_dir, "model": model,
                 "n_members": len(members), "n_nonmembers": len(nonmembers),
                 "member_hashes": members.hashes, "nonmember_hashes": nonmembers.hashes},
        "model": adapter.describe(),
        "reference_model": None if reference is None else reference.describe(),
        "split": split.to_dict(),
        "families": [{"label": label, "name": f.name, "config": f.config_dict(), "cost": asdict(f.cost(adapter))}
                     for label, f in families.items()],
        "methods": {m: r.to_dict() for m, r in results.items()},
        "shift": shift.to_dict(),
        "audit": audit,
        "mixing": mixing,
        "environment": environment_report(),
        "total_seconds": time.perf_counter() - t0,
    }
    atomic_write_text(out / BENCHMARK_FILE, json.dumps(_jsonable(result), indent=2, allow_nan=False))
    atomic_write_text(out / REPORT_FILE, render_html(result))
    return result


def _jsonable(value: Any) -> Any:
    """Strict-JSON copy: NaN and infinities become None, numpy scalars and arrays plain Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- text and HTML
def _pct(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method in CopyMark's Table 5 layout (percentages as text, exceedance flags)."""
    rows = []
    for name, r in result["methods"].items():
        cal, test, cost = r["calibration"], r["test"], r.get("cost") or {}
        rows.append({
            "method": name,
            "cal_tpr_1": _pct(cal["tpr_at_1fpr"]), "cal_tpr_01": _pct(cal["tpr_at_01fpr"]),
            "cal_auc": _pct(cal["auc"]),
            "test_tpr_1": _pct(test["tpr_1"]), "test_fpr_1": _pct(test["fpr_1"]),
            "test_tpr_01": _pct(test["tpr_01"]), "test_fpr_01": _pct(test["fpr_01"]),
            "flag_1": bool(test["fpr_1_exceeds_bound"]), "flag_01": bool(test["fpr_01_exceeds_bound"]),
            "calls": f"{cost.get('forward', 0)}+{cost.get('backward', 0)}",
            "seconds": f"{cost.get('seconds', 0.0):.3f}",
            "protocol": r["calibration_protocol"],
        })
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The console table (percentages; ``!`` marks a test FPR above its bound)."""
    header = (f"{'method':<10} {'cal TPR@1%':>10} {'cal TPR@.1%':>11} {'cal AUC':>8} {'test TPR/FPR@1%':>16} "
              f"{'test TPR/FPR@.1%':>17} {'calls f+b':>9} {'s/img':>7}")
    lines = [header, "-" * len(header)]
    for row in table_rows(result):
        t1 = f"{row['test_tpr_1']}/{row['test_fpr_1']}{'!' if row['flag_1'] else ''}"
        t01 = f"{row['test_tpr_01']}/{row['test_fpr_01']}{'!' if row['flag_01'] else ''}"
        lines.append(f"{row['method']:<10} {row['cal_tpr_1']:>10} {row['cal_tpr_01']:>11} {row['cal_auc']:>8} "
                     f"{t1:>16} {t01:>17} {row['calls']:>9} {row['seconds']:>7}")
    shift, audit = result["shift"], result["audit"]
    lines.append("! = test FPR above its bound (the calibration threshold did not transfer)")
    lines.append(f"shift members vs non-members ({shift['encoder']}): Frechet {shift['frechet']:.4f}, "
                 f"probe AUC {shift['probe']['auc']:.3f}")
    if audit.get("skipped"):
        lines.append(f"audit not run: {audit['skipped']}")
    else:
        lines.append(f"audit (test split, CDI features): verdict {audit['verdict']}, p = {audit['p_value']:.3g}")
    mixing = result.get("mixing") or []
    if mixing:
        lines.append("mixing (calibration AUC / TPR@1%FPR, percent, by share of shifted non-members):")
        lines.append(f"{'method':<10}" + "".join(f"{row['fraction']:>14g}" for row in mixing))
        lines.append(f"{'Frechet':<10}" + "".join(f"{row['frechet']:>14.4f}" for row in mixing))
        for method in mixing[0]["methods"]:
            cells = (f"{_pct(row['methods'][method]['auc'])}/{_pct(row['methods'][method]['tpr_at_1fpr'])}"
                     for row in mixing)
            lines.append(f"{method:<10}" + "".join(f"{cell:>14}" for cell in cells))
    return "\n".join(lines)


def _line_style(i: int) -> dict[str, str]:
    """Colour and dash of the i-th method's line: ten colours, then the same colours dashed (12 methods)."""
    return {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}


def roc_plot_svg(result: dict[str, Any]) -> str:
    """Log-log ROC curves of every method on the calibration and on the test split: two inline SVGs,
    each with its own legend."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    from cdi.reports.plots import _log_log, _styled, _to_svg

    @_styled
    def panel(split: str) -> str:
        ax = Figure(figsize=(4.6, 5.6)).add_subplot()
        floor = 1.0
        for i, (name, r) in enumerate(result["methods"].items()):
            labels, scores = r["scores"][f"{split}_labels"], r["scores"][f"{split}_scores"]
            fpr, tpr, _ = roc_curve(labels, scores)
            floor = min(floor, 1.0 / max(1, labels.count(0)))
            keep = (fpr > 0) & (tpr > 0)
            ax.plot(fpr[keep], tpr[keep], linewidth=1.3, label=name, **_line_style(i))
        ax.plot([floor, 1], [floor, 1], color="#666666", linestyle=":", linewidth=1.0, label="chance")
        ax.axvline(0.01, color="#666666", linestyle="--", linewidth=0.8, label="1% FPR")
        _log_log(ax)
        ax.set_xlim(floor / 1.5, 1.05)
        ax.set_ylim(floor / 1.5, 1.05)
        ax.set_title(f"{split} split", fontsize=11)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=9)
        return _to_svg(ax.figure, f"benchroc-{split}")

    return panel("calibration") + "\n" + panel("test")


def mixing_plot_svg(result: dict[str, Any]) -> str:
    """Calibration AUC of each method against the shifted share of non-members, with the Frechet distance."""
    from matplotlib.figure import Figure

    from cdi.reports.plots import _to_svg

    rows = result["mixing"]
    fractions = [r["fraction"] for r in rows]
    fig = Figure(figsize=(7.5, 3.2))
    left, right = fig.subplots(1, 2)
    for i, method in enumerate(rows[0]["methods"]):
        left.plot(fractions, [r["methods"][method]["auc"] for r in rows], marker="o", linewidth=1.2, label=method,
                  **_line_style(i))
    left.set_xlabel("share of shifted non-members")
    left.set_ylabel("calibration AUC")
    left.legend(loc="best", fontsize=7)
    right.plot(fractions, [r["frechet"] for r in rows], marker="o", color="#333333")
    right.set_xlabel("share of shifted non-members")
    right.set_ylabel("Frechet distance (members vs non-members)")
    return _to_svg(fig, "benchmix")


def render_html(result: dict[str, Any]) -> str:
    """The self-contained ``benchmark.html`` (``reports.benchmark``: autoescaped text, inline SVG plots)."""
    from cdi.reports.benchmark import render_benchmark

    result = _jsonable(result)
    return render_benchmark(result, table_rows(result), roc_plot_svg(result),
                            mixing_plot_svg(result) if result.get("mixing") else "", _pct)
