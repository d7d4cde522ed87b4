"""Web copies against originals on the toy world: stored features, the null calibration and the shift guard.

A creator's published images are usually web copies (JPEG) while the
unpublished ones are the originals (``cdi.data.harmonise``). Three steps:

1. ``extract``: the default features (cdi+clid+sima, seed 0) of the light toy
   world's images as an audit of web copies against originals computes them
   (``--strength light``; run from the repository root, 1 thread, about 10
   minutes on a shared 2-core machine)::

       python benchmarks/web_copies.py extract --out tests/data/toy_sd_light_web_features.csv

   Rows ``web/nonmembers/<file>.jpg`` (and with ``--members``
   ``web/members/<file>.jpg``): the web copies (``cdi.toy.data.web_copy``, JPEG quality 85, 4:2:0);
   ``harmonised/nonmembers/<file>.png``: the original non-members through
   the harmonised preprocessing of such an audit (one JPEG generation at
   quality 85, 4:2:0, as ``cdi.data.harmonise.plan_harmonisation`` decides for
   these collections). The web copies already are that JPEG and are not
   re-encoded, so their rows are what an audit with or without
   harmonisation feeds the model. The original non-members as decoded
   (no harmonisation) are the ``nonmembers/`` rows of
   ``tests/data/toy_sd_light_features.csv`` (same model, features, seed).

2. ``null``: from those tables, ``--draws`` audits per size of P = web copies
   of n non-members against U = n other non-members, harmonised (U
   re-encoded) and not (U as decoded), with the pooled verdict; prints the
   rejection rates at 0.05 and 0.01 with their 99% binomial intervals, the
   mean prior t, and the power of web copies of members against harmonised
   non-members::

       python benchmarks/web_copies.py null --draws 300

3. ``guard``: the shift guard (built-in descriptors, what ``--shift-encoder
   auto`` uses without a CLIP download) on P = web copies of n non-members
   and U = n other non-members, as the audit runs it: on the pixels the
   model sees (harmonised) and on the plain decode (not harmonised); the
   descriptors of every image are computed once, then ``--draws`` draws::

       python benchmarks/web_copies.py guard --draws 300
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PLAIN_TABLE = ROOT / "tests" / "data" / "toy_sd_light_features.csv"
WEB_TABLE = ROOT / "tests" / "data" / "toy_sd_light_web_features.csv"


def web_folder(src: Path, dst: Path, quality: int | str = 85) -> Path:
    """The web copies (``.jpg``) of every image of a toy-world folder, with their captions."""
    import json

    from PIL import Image

    from cdi.data.collection import ImageCollection
    from cdi.toy.data import web_copy, web_copy_name

    dst.mkdir(parents=True)
    lines = []
    for record in ImageCollection.from_folder(src).records:
        with Image.open(src / record.path) as image:
            (dst / web_copy_name(record.path)).write_bytes(web_copy(image, quality))
        lines.append(json.dumps({"file_name": web_copy_name(record.path), "text": record.caption}))
    (dst / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def extract(args) -> None:
    import torch

    from cdi.data.collection import ImageCollection
    from cdi.features.extract import extract_features
    from cdi.features.registry import resolve_features
    from cdi.data.harmonise import probe_collection
    from cdi.data.preprocess import harmonised_preprocess
    from cdi.models import load_model
    from cdi.engine.table import FeatureTable
    from cdi.toy.world import build_world

    torch.set_num_threads(args.threads)
    world = build_world("sd", args.strength)
    adapter = load_model(str(world.model_dir), device="cpu")
    families = resolve_features(args.features)
    work = Path(tempfile.mkdtemp(prefix="cdi-web-"))
    try:
        web = {half: ImageCollection.from_folder(web_folder(src, work / half, _quality(args.quality)))
               for half, src in (("members", world.members_dir), ("nonmembers", world.nonmembers_dir))}
        originals = ImageCollection.from_folder(world.nonmembers_dir)
        plan, pre = harmonised_preprocess(probe_collection(web["nonmembers"]), probe_collection(originals),
                                          adapter.resolution, adapter.image_channels)
        print("harmonisation:", "; ".join(plan.reasons))
        parts = [("web/nonmembers/", web["nonmembers"]), ("harmonised/nonmembers/", originals)]
        if args.members:
            parts.append(("web/members/", web["members"]))
        tables = [(prefix, extract_features(adapter, c, families, seed=0, batch_size=args.batch_size,
                                            num_workers=0, preprocess=pre)) for prefix, c in parts]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = tables[0][1]
    both = FeatureTable(
        paths=[prefix + p for prefix, t in tables for p in t.paths],
        hashes=[h for _, t in tables for h in t.hashes],
        captions=[c for _, t in tables for c in t.captions],
        columns=first.columns,
        values=np.vstack([t.values for _, t in tables]),
        meta={**first.meta, "toy": {"kind": "sd", "strength": args.strength, "web_quality": args.quality},
              "harmonisation": plan.to_dict()},
    )
    both.to_csv(args.out)
    print(f"wrote {len(both)} rows x {len(both.columns)} columns to {args.out}")


def _quality(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _rows(table, prefix: str) -> np.ndarray:
    return table.values[[i for i, p in enumerate(table.paths) if p.startswith(prefix)]]


def _stem(path: str) -> str:
    return Path(path).stem


def load_pools(web_table: Path = WEB_TABLE, plain_table: Path = PLAIN_TABLE) -> dict[str, np.ndarray]:
    """Feature pools aligned by image (row i of every non-member pool is the same digit).

    ``web`` (web copies of non-members), ``harmonised`` (originals, re-encoded),
    ``plain`` (originals as decoded), ``web_members`` (web copies of members).
    """
    from cdi.engine.table import FeatureTable

    web, plain = FeatureTable.from_csv(web_table), FeatureTable.from_csv(plain_table)
    if web.columns != plain.columns:
        raise SystemExit("the two tables have different columns")
    pools = {}
    for name, table, prefix in (("web", web, "web/nonmembers/"), ("harmonised", web, "harmonised/nonmembers/"),
                                ("plain", plain, "nonmembers/")):
        rows = sorted((i for i, p in enumerate(table.paths) if p.startswith(prefix)),
                      key=lambda i: _stem(table.paths[i]))
        pools[name] = table.values[rows]
        pools[name + "_names"] = [_stem(table.paths[i]) for i in rows]
    if not pools["web_names"] == pools["harmonised_names"] == pools["plain_names"]:
        raise SystemExit("the tables do not hold the same non-members")
    pools["web_members"] = _rows(web, "web/members/")  # empty unless extracted with --members
    return pools


def null_draws(p_pool: np.ndarray, u_pool: np.ndarray, n: int, draws: int, seed: int, directions,
               alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``draws`` pooled verdict p-values and prior t's, P = n rows of ``p_pool``, U = n *other* rows of
    ``u_pool`` (the pools are aligned by image, so no image is in both)."""
    from cdi.stats import audit_test

    rng = np.random.default_rng(seed)
    pvalues, prior_t = [], []
    for _ in range(draws):
        order = rng.permutation(len(p_pool))
        res = audit_test(p_pool[order[:n]], u_pool[order[n:2 * n]], directions=directions, permutations=0,
                         alpha=alpha, seed=0)
        pvalues.append(res.verdict_p)
        prior_t.append(_prior_t(res))
    return np.asarray(pvalues), np.asarray(prior_t, dtype=float)


def _prior_t(res) -> float:
    """The t of the pooled verdict's part 1 (the prior score along the known member directions)."""
    value = (getattr(res, "pooled", None) or {}).get("prior_t")
    return float("nan") if value is None else float(value)


def binomial_interval(k: int, n: int, level: float = 0.99) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate."""
    from scipy import stats

    low = stats.beta.ppf((1 - level) / 2, k, n - k + 1) if k > 0 else 0.0
    high = stats.beta.ppf(1 - (1 - level) / 2, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def null(args) -> None:
    from cdi.features.registry import directions_of, resolve_features

    pools = load_pools(Path(args.web_table))
    directions = directions_of(resolve_features("cdi+clid+sima"))
    print(f"{'setting':<34} {'n':>4} {'draws':>5}  {'p<0.05 [99% interval]':>22}  {'p<0.01':>6}  [99% interval]")
    for label, u_name in (("web vs originals, harmonised", "harmonised"),
                          ("web vs originals, not harmonised", "plain")):
        for n in args.sizes:
            p, t = null_draws(pools["web"], pools[u_name], n, args.draws, args.seed + n, directions)
            k05, k01 = int((p < 0.05).sum()), int((p < 0.01).sum())
            low, high = binomial_interval(k01, len(p))
            low5, high5 = binomial_interval(k05, len(p))
            print(f"{label:<34} {n:>4} {len(p):>5}  {k05 / len(p):>6.3f} [{low5:.3f},{high5:.3f}]  "
                  f"{k01 / len(p):>6.3f}  [{low:.3f}, {high:.3f}]  mean prior t {np.nanmean(t):+.2f}")
    from cdi.stats import audit_test

    rng = np.random.default_rng(args.seed)
    for n in args.sizes if len(pools["web_members"]) else ():
        hits = 0
        for _ in range(args.power_draws):
            p = pools["web_members"][rng.choice(len(pools["web_members"]), n, replace=False)]
            u = pools["harmonised"][rng.choice(len(pools["harmonised"]), n, replace=False)]
            hits += audit_test(p, u, directions=directions, permutations=0, alpha=0.01, seed=0).rejected
        print(f"power: web copies of members vs harmonised non-members, n={n}: {hits}/{args.power_draws} "
              f"rejected at 0.01")


def guard(args) -> None:
    import torch

    from cdi.data.collection import ImageCollection
    from cdi.data.harmonise import probe_collection
    from cdi.data.preprocess import harmonised_preprocess
    from cdi.data.shift_guard import image_embeddings, shift_guard
    from cdi.toy.world import build_world

    torch.set_num_threads(1)
    world = build_world("sd", "light")
    work = Path(tempfile.mkdtemp(prefix="cdi-web-"))
    try:
        web = ImageCollection.from_folder(web_folder(world.nonmembers_dir, work / "web", _quality(args.quality)))
        originals = ImageCollection.from_folder(world.nonmembers_dir)
        plan, pre = harmonised_preprocess(probe_collection(web), probe_collection(originals), 32, 3)
        print("harmonisation:", "; ".join(plan.reasons))
        embeddings = {}
        for label, seen in (("harmonised", pre), ("not harmonised", None)):
            embeddings[label] = [image_embeddings(c, encoder="builtin", harmonisation=seen, num_workers=0)[0]
                                 for c in (web, originals)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names_web = [Path(r.path).stem for r in web.records]
    names_orig = [Path(r.path).stem for r in originals.records]
    if names_web != names_orig:
        raise SystemExit("web copies and originals are not in the same order")
    print(f"{'guard on':<16} {'n':>4} {'draws':>5}  stopped at 0.05 (99% interval)")
    for label, (emb_web, emb_orig) in embeddings.items():
        for n in args.sizes:
            rng = np.random.default_rng(args.seed + n)
            stopped = 0
            for _ in range(args.draws):
                order = rng.permutation(len(emb_web))
                stopped += shift_guard(emb_web[order[:n]], emb_orig[order[n:2 * n]], alpha=0.05, seed=0).detected
            low, high = binomial_interval(stopped, args.draws)
            print(f"{label:<16} {n:>4} {args.draws:>5}  {stopped / args.draws:.3f} [{low:.3f}, {high:.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract")
    ex.add_argument("--strength", default="light")
    ex.add_argument("--features", default="cdi+clid+sima")
    ex.add_argument("--out", default=str(WEB_TABLE))
    ex.add_argument("--batch-size", default="auto")
    ex.add_argument("--threads", type=int, default=1)
    ex.add_argument("--members", action="store_true", help="also the web copies of the members (for power)")
    ex.add_argument("--quality", default="85", help="JPEG quality of the web copies, or a Pillow preset (web_high)")
    for name in ("null", "guard"):
        p = sub.add_parser(name)
        p.add_argument("--draws", type=int, default=300)
        p.add_argument("--sizes", type=int, nargs="+", default=[100, 300])
        p.add_argument("--seed", type=int, default=0)
        if name == "null":
            p.add_argument("--power-draws", type=int, default=100)
            p.add_argument("--web-table", default=str(WEB_TABLE))
        else:
            p.add_argument("--quality", default="85", help="JPEG quality of the web copies, or a Pillow preset")
    args = parser.parse_args()
    {"extract": extract, "null": null, "guard": guard}[args.command](args)


if __name__ == "__main__":
    main()
