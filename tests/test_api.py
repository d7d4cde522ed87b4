"""The Python API (``cdi.api``): audits from objects in memory, writing no file unless asked."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest

import cdi
from cdi.utils.errors import CDIError
from cdi.engine.table import FeatureTable

WRITE_MODES = set("wax+")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.fixture
def no_writes(monkeypatch, tmp_path):
    """Run from an empty folder and fail any attempt to open a file for writing."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if WRITE_MODES & set(mode) and not str(file).startswith("/dev/"):
            raise AssertionError(f"the API opened {file} for writing")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and not str(path).startswith("/dev/"):
            raise AssertionError(f"the API opened {path} for writing")
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    return cwd


def image_folder(folder: Path, n: int, seed: int) -> Path:
    from test_extract import write_images

    return write_images(folder, n=n, seed=seed)


def test_audit_of_images_with_an_adapter_in_memory_writes_nothing(tmp_path, tiny_adapters, no_writes):
    before = files_under(tmp_path)
    result = cdi.api.audit(COLLECTIONS["published"], COLLECTIONS["unpublished"], tiny_adapters["sd"],
                           features="denoising_loss", folds=2, permutations=50, sample_size_resamples=0,
                           shift_encoder="builtin", batch_size=4)
    assert isinstance(result, cdi.AuditResult)
    assert result.verdict in ("used", "not_detected", "inconclusive")
    assert result.n_published == result.n_unpublished == 12
    assert result.shift_guard is not None and result.shift_guard.encoder == "builtin"
    assert result.model["model_id"] == tiny_adapters["sd"].model_id
    assert files_under(tmp_path) == before and not any(no_writes.iterdir())


COLLECTIONS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def collections(tmp_path_factory):
    from cdi.data.collection import ImageCollection

    root = tmp_path_factory.mktemp("api")
    COLLECTIONS["published"] = ImageCollection.from_folder(image_folder(root / "p", 12, seed=1), name="published")
    COLLECTIONS["unpublished"] = ImageCollection.from_folder(image_folder(root / "u", 12, seed=2),
                                                             name="unpublished")


def tables(shift: float, n: int = 60, seed: int = 0) -> tuple[FeatureTable, FeatureTable]:
    rng = np.random.default_rng(seed)

    def table(offset: float, tag: str) -> FeatureTable:
        values = rng.normal(size=(n, 3)) + offset
        return FeatureTable([f"{tag}{i}.png" for i in range(n)], [f"{tag}{i:063d}" for i in range(n)],
                            [None] * n, ["a", "b", "c"], values)

    return table(shift, "p"), table(0.0, "u")


def test_audit_of_feature_tables_needs_no_model_and_writes_nothing(no_writes):
    published, unpublished = tables(shift=1.0)
    result = cdi.api.audit(published, unpublished, directions=[1, 1, 1], folds=2, permutations=100,
                           sample_size_resamples=0)
    assert result.verdict == "used" and result.p_value < 1e-6
    assert result.shift_guard is None  # no images, no shift guard
    null = cdi.api.audit(*tables(shift=0.0, seed=1), directions=[1, 1, 1], folds=2, permutations=100,
                         sample_size_resamples=0)
    assert null.verdict == "not_detected"
    assert not any(no_writes.iterdir())


def test_audit_writes_the_usual_files_when_asked(tmp_path):
    published, unpublished = tables(shift=1.0)
    out = tmp_path / "audit"
    result = cdi.api.audit(published, unpublished, directions=[1, 1, 1], folds=2, permutations=100,
                           sample_size_resamples=0, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["features.csv", "features.csv.json", "report.html",
                                                     "result.json"]
    assert cdi.AuditResult.load(out).p_value == result.p_value


def test_api_refuses_mixed_or_incomplete_inputs():
    published, unpublished = tables(shift=0.0)
    with pytest.raises(CDIError, match="both be feature tables"):
        cdi.api.audit(published, COLLECTIONS["unpublished"])
    with pytest.raises(CDIError, match="directions"):
        cdi.api.audit(published, unpublished, folds=2)
    with pytest.raises(CDIError, match="needs a model"):
        cdi.api.audit(COLLECTIONS["published"], COLLECTIONS["unpublished"])
