"""The fine-tune toy world (cdi.toy.lora): stored features, null calibration and power, with and without the reference.

    python benchmarks/lora_toy.py features --out tests/data      # extract (resumable with --store)
    python benchmarks/lora_toy.py power --data tests/data        # power table and null rejection rates

``features`` extracts FEATURES on every image the tables need, on three models:
the base (light toy SD), base + light LoRA and base + strong LoRA, sharing
one feature store; it writes ``toy_lora_<model>_features.csv`` (paths
prefixed by their folder: ``artist_published/``, ``artist_unpublished/``,
``artist_unused/``, ``members/``, ``nonmembers/``). ``artist_unused`` is a
seeded draw of UNUSED_SIZE images, plain members and non-members one of
PLAIN_SIZE each (the non-members among the plain copies of images the LoRA
never saw); the light LoRA's table holds the artist's images only.

``power`` reads them and prints, for each LoRA strength, the share of
seeded draws with p < 0.01 at n = 25, 50, 100, 200 (P from the LoRA's
training images, U from the artist's images it never saw), for the plain
audit of base + LoRA and for the reference-calibrated audit; then the null
rejection rates of the calibrated audit (differences only, and raw +
differences) in the two null cases, and how much of the base's memory of
its own members each model keeps (``base_memory``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FEATURES = "denoising_loss,pia,multiple_loss,clid"
PLAIN_SIZE = 200
UNUSED_SIZE = 250
MODELS = ("base", "strong", "light")


def table_path(folder: Path, model: str) -> Path:
    return Path(folder) / f"toy_lora_{model}_features.csv"


def extract(out: Path, store: str | None, threads: int) -> None:
    import torch

    from cdi.data.collection import ImageCollection
    from cdi.models import load_model
    from cdi.models.finetune import LoraSpec
    from cdi.engine.table import FeatureTable
    from cdi.toy.lora import build_lora_world
    from cdi.features.extract import extract_features
    from cdi.features.registry import resolve_features

    torch.set_num_threads(threads)
    world = build_lora_world(progress=True)
    families = resolve_features(FEATURES)
    rng = np.random.default_rng(13)
    plain_nonmembers = {p.name for n in ("artist_unpublished", "artist_unused") for p in world.folders[n].glob("*.png")}
    collections = {}
    for name, allowed, size in (("artist_published", None, None), ("artist_unpublished", None, None),
                                ("artist_unused", None, UNUSED_SIZE), ("members", None, PLAIN_SIZE),
                                ("nonmembers", plain_nonmembers, PLAIN_SIZE)):
        full = ImageCollection.from_folder(world.folders[name], name=name)
        rows = [i for i, r in enumerate(full.records) if allowed is None or Path(r.path).name in allowed]
        if size is not None:
            rows = sorted(rng.choice(rows, size, replace=False).tolist())
        collections[name] = full.subset(rows)
    for model in MODELS:
        loras = [] if model == "base" else [LoraSpec(world.lora_files[model], 1.0)]
        adapter = load_model(str(world.base_dir), device="cpu", loras=loras)
        wanted = collections if model != "light" else {k: v for k, v in collections.items() if k.startswith("artist")}
        tables = []
        for name, collection in wanted.items():
            table = extract_features(adapter, collection, families, seed=0, batch_size=64, store=store,
                                     num_workers=0, progress=True)
            table.paths = [f"{name}/{p}" for p in table.paths]
            tables.append(table)
        both = FeatureTable.concat(tables)
        both.meta = {**tables[0].meta, "toy_lora": {"model": model, "features": FEATURES}}
        both.to_csv(table_path(out, model))
        print(f"wrote {len(both)} rows to {table_path(out, model)}")


def load_tables(folder: Path) -> dict:
    """{model: FeatureTable} of the stored tables, rows in the base table's order."""
    from cdi.engine.table import FeatureTable

    return {m: FeatureTable.from_csv(table_path(folder, m)) for m in MODELS if table_path(folder, m).is_file()}


def rows_of(table, prefix: str) -> np.ndarray:
    return np.array([i for i, p in enumerate(table.paths) if p.startswith(prefix + "/")])


def matched(target, reference, prefix: str, *, calibrated: bool, with_raw: bool = False) -> np.ndarray:
    """Feature rows of one folder: raw target, or target minus reference (rows matched by image hash)."""
    from cdi.audit.reference import calibrated_matrix

    rows = rows_of(target, prefix)
    if not calibrated:
        return target.values[rows]
    index = {h: i for i, h in enumerate(reference.hashes)}
    ref_rows = [index[target.hashes[i]] for i in rows]
    return calibrated_matrix(target.values[rows], reference.values[ref_rows], with_raw=with_raw)


def directions(with_raw: bool = False) -> list[int]:
    from cdi.features.registry import directions_of, resolve_features

    d = list(directions_of(resolve_features(FEATURES)))
    return d + d if with_raw else d


VARIANTS = {  # name: (calibrated, with_raw)
    "without reference": (False, False),
    "with reference (difference only)": (True, False),
    "with reference (raw + difference)": (True, True),
}


def power(tables: dict, strength: str, sizes=(25, 50, 100, 200), draws: int = 200, seed: int = 0) -> dict:
    """Share of draws with p < 0.01 (the verdict, ``cdi.stats.verdict.audit_test``): P from the LoRA's training
    images, U from the artist's images it never saw, for each of VARIANTS on the same draws."""
    from cdi.stats.verdict import audit_test

    target, base = tables[strength], tables["base"]
    out = {}
    for name, (calibrated, with_raw) in VARIANTS.items():
        pool_p = matched(target, base, "artist_published", calibrated=calibrated, with_raw=with_raw)
        pool_u = np.vstack([matched(target, base, f, calibrated=calibrated, with_raw=with_raw)
                            for f in ("artist_unpublished", "artist_unused")])
        rng = np.random.default_rng(seed)
        row = {}
        for n in sizes:
            hits = 0
            for i in range(draws):
                p = pool_p[rng.choice(len(pool_p), n, replace=False)]
                u = pool_u[rng.choice(len(pool_u), n, replace=False)]
                hits += audit_test(p, u, directions=directions(with_raw), permutations=0, seed=i).verdict_p < 0.01
            row[n] = hits / draws
        out[name] = row
    return out


def null_pools(tables: dict, strength: str = "strong", with_raw: bool = False) -> dict[str, tuple]:
    """The two null situations of the calibrated audit, as (P pool, U pool).

    ``artist``: P and U both from the artist's images no model saw. ``base_members``: P from the base's
    training data (plain style), U from plain images neither model saw.
    """
    target, base = tables[strength], tables["base"]
    unseen = np.vstack([matched(target, base, f, calibrated=True, with_raw=with_raw)
                        for f in ("artist_unpublished", "artist_unused")])
    return {"artist": (unseen, None),
            "base_members": (matched(target, base, "members", calibrated=True, with_raw=with_raw),
                             matched(target, base, "nonmembers", calibrated=True, with_raw=with_raw))}


def null_rate(p_pool, u_pool, *, n: int, audits: int, with_raw: bool = False, seed: int = 0) -> float:
    """Share of ``audits`` seeded draws (n + n) with p < 0.01; P and U from one pool when ``u_pool`` is None."""
    from cdi.stats.verdict import audit_test

    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(audits):
        if u_pool is None:
            rows = rng.choice(len(p_pool), 2 * n, replace=False)
            p, u = p_pool[rows[:n]], p_pool[rows[n:]]
        else:
            p, u = p_pool[rng.choice(len(p_pool), n, replace=False)], u_pool[rng.choice(len(u_pool), n, replace=False)]
        hits += audit_test(p, u, directions=directions(with_raw), permutations=0, seed=i).verdict_p < 0.01
    return hits / audits


def base_memory(tables: dict, n: int = 100, draws: int = 200, seed: int = 0) -> dict[str, float]:
    """Share of draws with p < 0.01 for "the base's members vs plain non-members" on each model's raw features.

    How much of the base's memory of its own training images a model keeps:
    what raw target columns would carry into the reference-calibrated audit
    (see ``cdi.audit.reference``).
    """
    from cdi.stats.verdict import audit_test

    out = {}
    for model in ("base", "strong"):
        table = tables[model]
        members, plain = table.values[rows_of(table, "members")], table.values[rows_of(table, "nonmembers")]
        rng = np.random.default_rng(seed)
        hits = 0
        for _ in range(draws):
            p = members[rng.choice(len(members), n, replace=False)]
            u = plain[rng.choice(len(plain), n, replace=False)]
            hits += audit_test(p, u, directions=directions(), permutations=0).verdict_p < 0.01
        out[model] = hits / draws
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features")
    f.add_argument("--out", default="tests/data")
    f.add_argument("--store", default=None)
    f.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("power")
    p.add_argument("--data", default="tests/data")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--audits", type=int, default=200)
    args = parser.parse_args()
    if args.command == "features":
        extract(Path(args.out), args.store, args.threads)
        return
    tables = load_tables(Path(args.data))
    for strength in ("light", "strong"):
        if strength in tables:
            for name, row in power(tables, strength, draws=args.draws).items():
                print(f"{strength:6s} {name:34s} " + "  ".join(f"n={n}: {share:.2f}" for n, share in row.items()))
    for model, share in base_memory(tables).items():
        print(f"{model:6s} raw features, the base's members vs plain non-members (n=100): {share:.2f} of draws p < 0.01")
    for with_raw in (False, True):
        for case, (pool_p, pool_u) in null_pools(tables, with_raw=with_raw).items():
            rate = null_rate(pool_p, pool_u, n=100, audits=args.audits, with_raw=with_raw)
            print(f"null {case:13s} {'raw + difference' if with_raw else 'difference only':17s} "
                  f"rejection rate at 0.01 (n=100, {args.audits} audits): {rate:.3f}")


if __name__ == "__main__":
    main()
