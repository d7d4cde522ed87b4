"""Session fixtures shared by the whole suite: tiny saved pipelines and their adapters.

``tiny_model_dirs``: family -> folder of a tiny randomly initialised pipeline
(16 px images), built once per session with ``cdi.models.tiny``:
"sd", "sd_v" (v-prediction), "sdxl", "ldm", "dit", "ddpm" (class-conditional,
with labels.json), "ddpm_uncond".

``tiny_adapters``: family -> ``load_model(folder, device="cpu",
dtype="float32")``. Shared by every test: do not modify an adapter (use
``copy.copy(adapter)`` to change an attribute, or load your own).

Heavy imports happen inside the fixtures, so test modules that do not use
them do not pay for diffusers.

The tests are laid out like the package: one folder per room (``tests/stats/``, ``tests/data/``, ...;
``tests/data/`` also holds the stored feature tables). Test modules import shared builders from each
other by module name (``from test_extract import write_images``), and the helpers beside this file
(``counting``, ``oracle``, ``ldm_checkpoint``) likewise, so every test folder is put on ``sys.path``
here, before any test module is collected.
"""

from __future__ import annotations

import os
import sys

# One thread everywhere, set before numpy and torch load (and inherited by every subprocess the tests
# start: CLI runs, Ray workers). The test models and matrices are tiny, so per-op overhead dominates; on
# a loaded 2-core machine a second OpenBLAS/OpenMP thread waiting for a busy core makes small ops tens of
# times slower (a 600 x 36 QR: 0.16-0.7 s with OpenBLAS's default threads, 0.003 s with one), and under
# pytest-xdist the workers would oversubscribe the cores. Fixed, not defaulted: no test may depend on the
# caller's thread settings.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

threadpool_limits(limits=1)  # in case a plugin imported numpy before this file
torch.set_num_threads(1)

# Hypothesis draws its examples from a fixed seed and keeps no example database: every run (and every
# xdist worker) tests the same examples, so a red run is reproducible and a green one stays green.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("cdi-tests", derandomize=True, database=None)
_hypothesis_settings.load_profile("cdi-tests")

TESTS = Path(__file__).resolve().parent
for _folder in sorted(TESTS.iterdir()):
    if _folder.is_dir() and any(_folder.glob("test_*.py")) and str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

TINY_FAMILIES = ("sd", "sd_v", "sdxl", "ldm", "dit", "ddpm", "ddpm_uncond")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    from cdi.models import tiny

    builders = {
        "sd": tiny.save_tiny_sd,
        "sd_v": lambda folder: tiny.save_tiny_sd(folder, prediction_type="v_prediction"),
        "sdxl": tiny.save_tiny_sdxl,
        "ldm": tiny.save_tiny_ldm,
        "dit": tiny.save_tiny_dit,
        "ddpm": tiny.save_tiny_ddpm,
        "ddpm_uncond": lambda folder: tiny.save_tiny_ddpm(folder, num_classes=None),
    }
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: builders[family](root / family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dirs):
    from cdi.models import load_model

    return {family: load_model(str(folder), device="cpu", dtype="float32") for family, folder in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def toy_sd_world(tmp_path_factory):
    """The sd-overtrained toy world (shipped weights), built once for every module that audits it.

    Read-only for the tests: copy what you change.
    """
    from cdi.toy.world import build_world

    return build_world("sd", "overtrained", tmp_path_factory.mktemp("toy") / "world", progress=False)


TINY_FLOW_FAMILIES = ("sd3", "sd3_no_t5", "flux_dev", "flux_schnell", "zimage")


@pytest.fixture(scope="session")
def tiny_flow_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny flow-matching pipelines (``cdi.models.tiny_flow``): SD3 with and without T5, FLUX.1 dev and
    schnell, Z-Image."""
    from cdi.models import tiny_flow

    builders = {
        "sd3": tiny_flow.save_tiny_sd3,
        "sd3_no_t5": lambda folder: tiny_flow.save_tiny_sd3(folder, with_t5=False),
        "flux_dev": tiny_flow.save_tiny_flux,
        "flux_schnell": lambda folder: tiny_flow.save_tiny_flux(folder, guidance_embeds=False),
        "zimage": tiny_flow.save_tiny_zimage,
    }
    root = tmp_path_factory.mktemp("tiny_flow_models")
    return {family: builders[family](root / family) for family in TINY_FLOW_FAMILIES}


@pytest.fixture(scope="session")
def tiny_flow_adapters(tiny_flow_dirs):
    """``load_model`` of each ``tiny_flow_dirs`` folder (CPU, float32); shared, do not modify."""
    from cdi.models import load_model

    return {family: load_model(str(folder), device="cpu", dtype="float32") for family, folder in tiny_flow_dirs.items()}


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> Path:
    """A tiny BLIP captioner saved with save_pretrained (cdi.models.tiny.save_tiny_captioner)."""
    from cdi.models import tiny

    return tiny.save_tiny_captioner(tmp_path_factory.mktemp("tiny_captioner") / "blip")
