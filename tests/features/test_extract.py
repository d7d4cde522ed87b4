"""The extraction engine (features.extract) and `cdi extract`.

Shows that a feature table does not depend on the batch size, on sharding
or on a kill -9 and resume, that a resumed run recomputes nothing that is
stored, that CUDA out-of-memory halves the batch without changing a value,
and that the command line validates its inputs before doing any work.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cdi.engine.batching import CPU_AUTO_BATCH
from cdi.data.collection import ImageCollection
from cdi.data.preprocess import Preprocess
from cdi.cli.main import app
from cdi.utils.errors import CDIError
from cdi.models import load_model
from cdi.models.base import DiffusionAdapter
from cdi.engine.store import FeatureStore
from cdi.engine.table import FeatureTable, sidecar_path
from cdi.features.base import Cost, EncodedBatch, FeatureFamily
from cdi.features.extract import condition_key, extract_features, model_key, parse_shard, shard_of
from cdi.features.registry import columns_of, resolve_features, total_cost
from counting import counting  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[2]
#: this module's folder and tests/ (its helper modules), for the subprocess that imports it
TEST_FOLDERS = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
N_IMAGES = 10
CHEAP = "denoising_loss,multiple_loss,pia"


# --------------------------------------------------------------------------
# Model, families and images
# --------------------------------------------------------------------------
def load_float64(folder) -> DiffusionAdapter:
    """The tiny SD of ``folder`` computing in float64 (its outputs are still float32).

    float32 kernels may round differently for another batch size (see
    ``test_float32_agrees_to_its_precision``); in float64 that rounding is
    far below float32's, so any difference left would be the engine's.
    """
    adapter = load_model(str(folder), device="cpu", dtype="float32")
    for module in (adapter.unet, adapter.vae, adapter.text_encoder):
        module.double()
    adapter.dtype = torch.float64
    return adapter


class Recorder(FeatureFamily):
    """Wraps a family: same name, key and values; records every image it computes.

    ``oom_above``: raise ``torch.cuda.OutOfMemoryError`` for batches larger
    than this, as a GPU would.
    """

    def __init__(self, inner: FeatureFamily, oom_above: int | None = None) -> None:
        self.inner, self.name, self.config, self.max_chunk = inner, inner.name, inner.config, None
        self.oom_above = oom_above
        self.computed: list[str] = []
        self.batch_sizes: list[int] = []

    def columns(self, adapter=None):
        return self.inner.columns(adapter)

    def cost(self, adapter):
        return self.inner.cost(adapter)

    def key(self):
        return self.inner.key()

    def check_applicable(self, adapter):
        self.inner.check_applicable(adapter)

    def extract(self, adapter, batch: EncodedBatch):
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.computed.extend(batch.hashes)
        self.batch_sizes.append(len(batch))
        return self.inner.extract(adapter, batch)


def recorders(spec: str = CHEAP, **kw) -> list[Recorder]:
    return [Recorder(f, **kw) for f in resolve_features(spec)]


def write_images(folder: Path, n: int = N_IMAGES, seed: int = 0) -> Path:
    """n small random RGB images (not square: preprocessing crops) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(18, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img_{i:02d}.png", "text": f"a picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("extract") / "images")


@pytest.fixture(scope="module")
def collection(images) -> ImageCollection:
    return ImageCollection.from_folder(images)


@pytest.fixture(scope="module")
def adapter(tiny_model_dirs) -> DiffusionAdapter:
    return load_float64(tiny_model_dirs["sd"])


@pytest.fixture(scope="module")
def reference(adapter, collection):
    """The full table, batch size 8, no store: what every other run must reproduce."""
    return extract_features(adapter, collection, resolve_features(CHEAP), seed=3, batch_size=8,
                            num_workers=0, progress=False)


def assert_same_values(table, ref, rtol=0.0, atol=1e-6):
    """The rows of ``table`` equal those of ``ref`` with the same image hash."""
    assert table.columns == ref.columns
    order = {h: k for k, h in enumerate(ref.hashes)}
    rows = [order[h] for h in table.hashes]
    np.testing.assert_allclose(table.values, ref.values[rows], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------
# Keys and shards
# --------------------------------------------------------------------------
def test_parse_shard():
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3/4 ") == (3, 4) and parse_shard((1, 2)) == (1, 2)
    assert parse_shard(None) is None
    for bad in ["4/4", "-1/4", "1/0", "1", "a/b", "1/2/3", "1.5/3", ""]:
        with pytest.raises(CDIError, match="shard"):
            parse_shard(bad)


def test_keys_follow_what_decides_a_value(adapter, tiny_adapters):
    pre = Preprocess(16, 3)
    key = model_key(adapter, pre)
    assert key.startswith("sd-float64-") and key == model_key(adapter, Preprocess(16, 3))
    assert model_key(adapter, Preprocess(16, 3, crop="resize")) != key
    assert model_key(tiny_adapters["sd"], pre).startswith("sd-float32-")
    other = copy.copy(adapter)
    other.fingerprint = "f" * 64
    assert model_key(other, pre) != key
    assert condition_key(adapter, "a cat") != condition_key(adapter, "a dog")
    assert condition_key(adapter, None) == "text:none"
    ldm = tiny_adapters["ldm"]
    assert condition_key(ldm, "a cat") == condition_key(ldm, None) == ""
    ddpm = tiny_adapters["ddpm"]  # class-conditional: the class id, however the caption names it
    assert condition_key(ddpm, "3") == condition_key(ddpm, ddpm.id2label[3]) == "class:3"


# --------------------------------------------------------------------------
# Invariance
# --------------------------------------------------------------------------
def test_batch_size_does_not_change_values(adapter, collection, reference, monkeypatch):
    """In float64 the table is bit-identical for batch sizes 1 and 8; each image is encoded once."""
    assert reference.values.shape == (N_IMAGES, 13) and np.isfinite(reference.values).all()
    assert reference.paths == [r.path for r in collection.records]
    assert reference.captions == [r.caption for r in collection.records]
    encoded, encode = [], adapter.encode
    monkeypatch.setattr(adapter, "encode", lambda pixels: encoded.append(len(pixels)) or encode(pixels))
    one = extract_features(adapter, collection, resolve_features(CHEAP), seed=3, batch_size=1,
                           num_workers=0, progress=False)
    monkeypatch.undo()
    assert encoded == [1] * N_IMAGES  # one encode per image, shared by the three families
    assert_same_values(one, reference)
    other_seed = extract_features(adapter, collection, resolve_features("denoising_loss"), seed=4,
                                  batch_size=8, num_workers=0, progress=False)
    assert np.abs(other_seed.values[:, 0] - reference.values[:, 0]).min() > 0


def test_no_network_call_exceeds_the_batch_size(adapter, collection, reference, monkeypatch):
    """``batch_size`` bounds the samples of every network call, however a family expands its images;
    ``"auto"`` resolves to a whole batch size, recorded in the provenance, with the same values."""
    calls, eps = [], adapter.eps
    monkeypatch.setattr(adapter, "eps", lambda x, t, c: calls.append(x.shape[0]) or eps(x, t, c))
    table = extract_features(adapter, collection, resolve_features(CHEAP), seed=3, batch_size=3,
                             num_workers=0, progress=False)
    assert calls and max(calls) == 3  # denoising_loss alone expands 3 images into 15 samples
    assert_same_values(table, reference)
    monkeypatch.undo()
    auto = extract_features(adapter, collection, resolve_features(CHEAP), seed=3, batch_size="auto",
                            num_workers=0, progress=False)
    assert auto.meta["extraction"]["batch_size"] == CPU_AUTO_BATCH  # a fixed rule off CUDA, never timing
    assert_same_values(auto, reference)


def test_full_feature_set_is_batch_invariant(adapter, collection):
    """All 31 columns of cdi+clid (noise optimisation and gradient masking included):
    batch sizes 1 and 8 give the same table to 1e-6 (float64 network)."""
    families = resolve_features("cdi+clid")
    rows = collection.subset(range(8))
    eight = extract_features(adapter, rows, families, seed=3, batch_size=8, num_workers=0, progress=False)
    one = extract_features(adapter, rows, families, seed=3, batch_size=1, num_workers=0, progress=False)
    assert eight.values.shape == (8, 31) and np.isfinite(eight.values).all()
    assert_same_values(one, eight, atol=1e-6)


def test_engine_makes_each_shared_call_once(adapter, collection):
    """A counting adapter through the engine: the CDI set costs what it declares,
    43 forward and 14 backward network calls per image (the reference: 56 + 15)."""
    families = resolve_features("cdi")
    rows = collection.subset(range(4))
    with counting(adapter) as counts:
        table = extract_features(adapter, rows, families, seed=3, batch_size=2, num_workers=0, progress=False)
    assert total_cost(families, adapter) == Cost(43, 14)
    assert (counts["forward"], counts["backward"], counts["encode"]) == (4 * 43, 4 * 14, 4)
    assert table.meta["extraction"]["shared_calls_seconds"] > 0


def test_float32_agrees_to_its_precision(tiny_adapters, collection):
    """In float32, batched kernels round differently for another batch size.

    Measured on the tiny SD: up to 4.3e-6 relative (PIA, batch 1 vs 8);
    that is float32 rounding carried through two network calls, not a
    dependence of one image's value on its batch mates (float64: identical).
    """
    sd = tiny_adapters["sd"]
    eight, one = (extract_features(sd, collection, resolve_features(CHEAP), seed=3, batch_size=bs,
                                   num_workers=0, progress=False) for bs in (8, 1))
    assert_same_values(one, eight, rtol=2e-5, atol=1e-6)


def test_shards_partition_the_images(adapter, collection, reference):
    tables = [extract_features(adapter, collection, resolve_features(CHEAP), seed=3, batch_size=3,
                               shard=f"{i}/2", num_workers=0, progress=False) for i in range(2)]
    for i, table in enumerate(tables):
        assert table.meta["shard"] == [i, 2]
        assert all(shard_of(h, 2) == i for h in table.hashes)
    assert 0 < len(tables[0]) < N_IMAGES and len(tables[0]) + len(tables[1]) == N_IMAGES
    joined = type(reference).concat(tables)
    assert joined.hashes == reference.hashes
    assert_same_values(joined, reference)


def test_store_resumes_and_adds_only_missing_families(adapter, collection, reference, tmp_path, monkeypatch):
    store_path = tmp_path / "store"
    # A sharded first run fills half of the store with two of the three families.
    first = recorders("denoising_loss,pia")
    extract_features(adapter, collection, first, seed=3, store=store_path, shard="0/2",
                     batch_size=4, num_workers=0, progress=False)
    done = set(first[0].computed)
    assert done == {h for h in collection.hashes if shard_of(h, 2) == 0}
    # The full run computes the other half for those two and everything for the third.
    fams = recorders()
    table = extract_features(adapter, collection, fams, seed=3, store=store_path, batch_size=4,
                             num_workers=0, progress=False)
    assert_same_values(table, reference)
    by_name = {f.name: f for f in fams}
    assert sorted(by_name["denoising_loss"].computed) == sorted(set(collection.hashes) - done)
    assert sorted(by_name["pia"].computed) == sorted(set(collection.hashes) - done)
    assert sorted(by_name["multiple_loss"].computed) == sorted(collection.hashes)
    # Images missing the same families were batched together: the shard's images in batches of 4.
    assert by_name["multiple_loss"].batch_sizes[0] == 4
    assert table.meta["extraction"]["from_store"]["pia"] == len(done)
    # A third run computes nothing at all and never encodes an image.
    again = recorders()
    encoded = []
    monkeypatch.setattr(adapter, "encode", lambda pixels: encoded.append(len(pixels)))
    with FeatureStore(store_path) as store:
        table2 = extract_features(adapter, collection, again, seed=3, store=store, num_workers=0,
                                  progress=False)
        assert len(store.provenance()) == 2 + 3  # runs that computed something
    assert encoded == [] and all(f.computed == [] for f in again)
    assert table2.values.tobytes() == table.values.tobytes()
    monkeypatch.undo()
    # A changed caption is a different key: recomputed, not served stale.
    changed = dataclasses.replace(
        collection, records=[dataclasses.replace(collection.records[0], caption="another")]
    )
    fresh = recorders("pia")
    extract_features(adapter, changed, fresh, seed=3, store=store_path, num_workers=0, progress=False)
    assert fresh[0].computed == [changed.records[0].sha256]


KILLED_RUN = """
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = {tests!r}
    from cdi.data.collection import ImageCollection
    from cdi.data.preprocess import Preprocess
    from cdi.features.extract import extract_features
    from cdi.features.registry import resolve_features
    from test_extract import CHEAP, Recorder, load_float64

    class HangsOnThirdBatch(Recorder):
        def extract(self, adapter, batch):
            if len(self.batch_sizes) == 2:          # batches 1 and 2 are stored by now
                print("hanging", flush=True)
                time.sleep(600)
            return super().extract(adapter, batch)

    fams = [HangsOnThirdBatch(f) if f.name == "pia" else Recorder(f) for f in resolve_features(CHEAP)]
    extract_features(load_float64(sys.argv[3]), ImageCollection.from_folder(sys.argv[1]), fams, seed=3,
                     batch_size=2, store=sys.argv[2], num_workers=0, progress=False)
"""


def test_killed_run_resumes_without_recomputing(adapter, collection, reference, images, tmp_path,
                                                tiny_model_dirs):
    store_path = tmp_path / "killed.sqlite"
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent(KILLED_RUN.format(tests=TEST_FOLDERS)))
    proc = subprocess.Popen([sys.executable, str(script), str(images), str(store_path),
                             str(tiny_model_dirs["sd"])], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the third batch is in flight: pia is computing it
        assert line.strip() == "hanging", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with FeatureStore(store_path) as store:
        assert store.count() == 3 * 4  # two batches of two images, three families; batch 3 lost
    stored = set()
    with FeatureStore(store_path) as store:
        for f in resolve_features(CHEAP):
            got = store.get_many(model_key(adapter, Preprocess(adapter.resolution, adapter.image_channels)), f.key(), 3, collection.hashes,
                                 [condition_key(adapter, c) for c in collection.captions])
            stored |= set(got)
    assert len(stored) == 4
    fams = recorders()
    resumed = extract_features(adapter, collection, fams, seed=3, batch_size=2, store=store_path,
                               num_workers=0, progress=False)
    for f in fams:
        assert sorted(f.computed) == sorted(set(collection.hashes) - stored)
    assert_same_values(resumed, reference)


# --------------------------------------------------------------------------
# Out of memory, validation
# --------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch(adapter, collection, reference, caplog):
    fams = recorders(oom_above=2)
    with caplog.at_level(logging.WARNING, logger="cdi"):
        table = extract_features(adapter, collection, fams, seed=3, batch_size=8, num_workers=0,
                                 progress=False)
    assert_same_values(table, reference)
    assert "out of GPU memory with 8 images per batch; going on with 4" in caplog.text
    assert "going on with 2" in caplog.text
    assert set(fams[0].batch_sizes) == {2} and table.meta["extraction"]["final_batch_size"] == 2
    with pytest.raises(CDIError, match="batch of one image.*bfloat16"):
        extract_features(adapter, collection, recorders("pia", oom_above=0), batch_size=4, num_workers=0,
                         progress=False)


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    pass


class _NaNFamily(FeatureFamily):
    name = "nan_family"
    config_class = _NoConfig

    def columns(self, adapter=None):
        return ["nan_value"]

    def cost(self, adapter):
        return Cost(0)

    def extract(self, adapter, batch):
        return torch.full((len(batch), 1), float("nan"))


def test_engine_validates_its_inputs(adapter, collection, tiny_adapters):
    kw = dict(num_workers=0, progress=False)
    with pytest.raises(CDIError, match="no feature families"):
        extract_features(adapter, collection, [], **kw)
    with pytest.raises(CDIError, match="requested twice"):
        extract_features(adapter, collection, resolve_features("pia") * 2, **kw)
    with pytest.raises(CDIError, match="batch-size"):
        extract_features(adapter, collection, resolve_features("pia"), batch_size=0, **kw)
    with pytest.raises(CDIError, match="shard"):
        extract_features(adapter, collection, resolve_features("pia"), shard="2/2", **kw)
    with pytest.raises(CDIError, match="unconditional"):
        extract_features(tiny_adapters["ldm"], collection, resolve_features("clid"), **kw)
    with pytest.raises(CDIError, match="non-finite.*float32"):
        extract_features(adapter, collection, [_NaNFamily()], **kw)


# --------------------------------------------------------------------------
# cdi extract
# --------------------------------------------------------------------------
runner = CliRunner()


def cli_extract(*args) -> object:
    return runner.invoke(app, ["extract", *map(str, args)])


def test_cli_extract_writes_the_table_and_resumes(images, tiny_model_dirs, tiny_adapters, collection, tmp_path):
    out, store = tmp_path / "out" / "features.csv", tmp_path / "cache"
    args = ["--images", images, "--model", tiny_model_dirs["sd"], "--features", CHEAP, "--out", out,
            "--batch-size", 4, "--seed", 3, "--store", store, "--device", "cpu", "--workers", 0]
    result = cli_extract(*args)
    assert result.exit_code == 0, result.output
    assert f"{N_IMAGES} images x 13 features written" in result.stdout
    table = FeatureTable.from_csv(out)
    assert table.paths == [r.path for r in collection.records] and table.hashes == collection.hashes
    assert table.meta["model"]["model_id"] == str(tiny_model_dirs["sd"]) and table.meta["seed"] == 3
    assert [f["name"] for f in table.meta["families"]] == CHEAP.split(",")
    assert table.meta["store"] == str(store / "features.sqlite")
    direct = extract_features(tiny_adapters["sd"], collection, resolve_features(CHEAP), seed=3,
                              batch_size=4, num_workers=0, progress=False)
    assert table.values.tobytes() == direct.values.tobytes()  # same inputs, same batch size: identical
    # Again with the store: nothing computed, same numbers; --shard writes only its rows.
    result = cli_extract(*args)
    assert result.exit_code == 0 and "0 family values computed, 30 read from the store" in result.stdout
    assert FeatureTable.from_csv(out).values.tobytes() == table.values.tobytes()
    result = cli_extract(*args[:-10], "--shard", "1/3", "--out", tmp_path / "shard.csv", "--store", store)
    assert result.exit_code == 0, result.output
    shard = FeatureTable.from_csv(tmp_path / "shard.csv")
    assert shard.hashes == [h for h in collection.hashes if shard_of(h, 3) == 1]


def test_cli_default_features_follow_the_model(tmp_path, tiny_model_dirs):
    write_images(tmp_path / "two", n=2)
    out = tmp_path / "f.csv"
    result = cli_extract("--images", tmp_path / "two", "--model", tiny_model_dirs["ldm"], "--out", out,
                         "--device", "cpu", "--workers", 0)
    assert result.exit_code == 0, result.output
    table = FeatureTable.from_csv(out)
    assert table.columns == columns_of(resolve_features("cdi+sima")) and len(table.columns) == 30
    assert "tip: pass --store" in result.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad_shard", "bad shard 3/3"),
        ("shard_syntax", "write it as I/N"),
        ("missing_folder", "does not exist"),
        ("clid_unconditional", "needs a conditional model"),
        ("unknown_family", "unknown feature family or set 'nope'"),
        ("out_is_folder", "is a folder"),
    ],
)
def test_cli_refuses_bad_input_before_any_work(case, message, images, tiny_model_dirs, tmp_path):
    out = tmp_path / "f.csv"
    # The model name is bogus except where the check needs the model: every other
    # check must fire before any attempt to load it.
    args = {"--images": images, "--model": "no-such/model", "--out": out, "--features": "pia",
            "--device": "cpu"}
    if case == "bad_shard":
        args["--shard"] = "3/3"
    elif case == "shard_syntax":
        args["--shard"] = "1-3"
    elif case == "missing_folder":
        args["--images"] = tmp_path / "nowhere"
    elif case == "clid_unconditional":
        args.update({"--model": tiny_model_dirs["ldm"], "--features": "pia,clid"})
    elif case == "unknown_family":
        args["--features"] = "pia,nope"
    elif case == "out_is_folder":
        args["--out"] = out = tmp_path
    result = cli_extract(*[x for kv in args.items() for x in kv])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and "Traceback" not in result.output
    assert message in result.stderr, result.stderr
    assert "no-such/model" not in result.stderr
    if case != "out_is_folder":
        assert not out.exists() and not sidecar_path(out).exists()
