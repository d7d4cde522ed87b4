"""Packaging: cdi installs its folders as cdi.features, cdi.attacks and cdi.reports.

No generic top-level import name is claimed, so a user's own ``features.py``
(or another distribution's ``features`` package) cannot shadow cdi's.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from test_data import save_image  # the image builder of the unit tests

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_cdi():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_to_name = {folder: name for name, folder in config["package-dir"].items()}
    expected = set()
    for top in ("cdi", "features", "attacks", "reports"):
        for init in (REPO / top).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO).parts
            expected.add(".".join([folder_to_name.get(parts[0], parts[0]), *parts[1:]]))
    data_packages = set(config["package-data"]) - {"cdi"}  # folders of data files, installed as packages
    assert set(config["packages"]) == expected | data_packages
    for name in data_packages:  # each is a real folder that holds no Python package
        top = max((k for k in config["package-dir"] if name.startswith(k + ".")), key=len, default=None)
        parts = [config["package-dir"][top], *name[len(top) + 1:].split(".")] if top else name.split(".")
        folder = REPO.joinpath(*parts)
        assert folder.is_dir() and not (folder / "__init__.py").exists(), name
    assert all(name == "cdi" or name.startswith("cdi.") for name in config["packages"])


def test_a_users_features_py_does_not_break_an_audit_run_from_its_folder(tmp_path, tiny_model_dirs):
    for name in ("features", "attacks", "reports"):  # what a user may well have lying around
        (tmp_path / f"{name}.py").write_text("raise ImportError('a user script, not cdi')\n")
    for i in range(10):
        save_image(tmp_path / "P" / f"p{i}.png", seed=i)
        save_image(tmp_path / "U" / f"u{i}.png", seed=100 + i)
    args = ["audit", "--published", "P", "--unpublished", "U", "--model", str(tiny_model_dirs["ddpm_uncond"]),
            "--out", "out", "--features", "denoising_loss", "--device", "cpu", "--permutations", "0",
            "--sample-size-resamples", "0", "--folds", "2"]
    # python -c puts the working directory first on sys.path, as an interactive session or a script there does
    done = subprocess.run([sys.executable, "-c", "from cdi.cli.main import app; app()", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (tmp_path / "out" / "result.json").is_file()
