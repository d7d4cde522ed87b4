"""Extraction on a local Ray instance of two CPU workers (cdi.engine.distributed).

Shows that the table equals the single-process one bit for bit (float64
network), that a worker process killed in the middle of a batch changes
nothing (the batch is redone once, nothing is counted twice), that a killed
driver resumes from its store computing only what is missing, and that
nothing but ``--ray`` needs Ray. One Ray instance serves the whole module.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cdi.cli.main import app
from cdi.engine.distributed import RayRunner, check_ray_options
from cdi.utils.errors import CDIError
from cdi.engine.store import FeatureStore
from cdi.engine.table import FeatureTable
from cdi.features.extract import extract_features
from cdi.features.registry import resolve_features
from test_extract import CHEAP, N_IMAGES, load_float64
from test_extract import adapter, collection, images  # noqa: F401 (the same module fixtures)

REPO = Path(__file__).resolve().parents[2]
#: the folders of this module, of test_extract (whose builders it imports) and tests/ (their helper modules),
#: for Ray workers and subprocesses
TEST_FOLDERS = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "features"),
                str(Path(__file__).resolve().parents[1])]
BATCH = 2  # 10 images: five batches, so both workers get several


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with two CPUs; its workers import this checkout and these tests."""
    import ray

    path = os.pathsep.join([str(REPO), *TEST_FOLDERS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path  # inherited by the raylet, so by every worker of every driver
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
    if previous is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = previous


@pytest.fixture(scope="module")
def reference(adapter, collection):
    """One process, same batches: what every Ray run must reproduce."""
    return extract_features(adapter, collection, resolve_features(CHEAP), seed=3, batch_size=BATCH,
                            num_workers=0, progress=False)


class Logged:
    """Wraps a family (same name, key, values); appends every image it computes to a log file.

    ``die_once``: the first worker to compute a batch kills its own process
    (SIGKILL) in the middle of it, before any value of the batch exists.
    ``hang_on``: hang (as a stuck GPU would) on the batch holding this image.
    """

    def __init__(self, inner, log: Path, die_once: Path | None = None, hang_on: str | None = None,
                 hanging: Path | None = None) -> None:
        self.inner, self.log, self.die_once, self.hang_on, self.hanging = inner, log, die_once, hang_on, hanging
        self.name, self.config, self.max_chunk = inner.name, inner.config, None

    def __getattr__(self, name):  # columns, directions, cost, key, config_dict, check_applicable, ...
        if name.startswith("__") or name == "inner":  # unpickling looks up attributes before inner exists
            raise AttributeError(name)
        return getattr(self.inner, name)

    def extract(self, adapter, batch):
        if self.die_once is not None:
            try:
                os.close(os.open(self.die_once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_on in batch.hashes:
            self.hanging.touch()
            time.sleep(600)
        out = self.inner.extract(adapter, batch)
        with open(self.log, "a") as f:
            f.write("".join(f"{self.name} {h}\n" for h in batch.hashes))
        return out


def logged(log: Path, **kw) -> list[Logged]:
    """The CHEAP families, logged; the first one (run first on every batch) dies or hangs as asked."""
    families = resolve_features(CHEAP)
    return [Logged(f, log, **(kw if k == 0 else {})) for k, f in enumerate(families)]


def computed(log: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        name, sha = line.split()
        out.setdefault(name, []).append(sha)
    return out


def float64_runner(tiny_model_dirs, **kw) -> RayRunner:
    return RayRunner(functools.partial(load_float64, str(tiny_model_dirs["sd"])), workers=2, threads=1,
                     device="cpu", **kw)


def test_two_workers_match_one_process_even_when_one_dies(ray_instance, adapter, collection, reference,
                                                          tiny_model_dirs, tmp_path):
    log, marker = tmp_path / "computed.log", tmp_path / "died"
    families = logged(log, die_once=marker)
    with float64_runner(tiny_model_dirs) as runner:
        table = extract_features(adapter, collection, families, seed=3, batch_size=BATCH,
                                 store=tmp_path / "store", progress=False, runner=runner)
        pids_before = {info["pid"] for info in runner.infos}
        pids_after = {ray_instance.get(a.info.remote())["pid"] for a in runner.actors}
    assert marker.exists() and len(pids_before) == 2
    assert len(pids_after - pids_before) == 1  # the killed worker was replaced
    assert table.hashes == reference.hashes and table.columns == reference.columns
    assert table.values.tobytes() == reference.values.tobytes()  # float64: bit for bit
    done = computed(log)
    for family in resolve_features(CHEAP):
        assert sorted(done[family.name]) == sorted(collection.hashes)  # the dead batch: redone once
    info = table.meta["extraction"]
    assert info["computed"] == {f.name: N_IMAGES for f in families}
    assert info["distributed"]["workers"] == 2 and info["distributed"]["kind"] == "ray"
    with FeatureStore(tmp_path / "store") as store:
        assert store.count() == 3 * N_IMAGES


KILLED_DRIVER = """
    import functools, sys
    sys.path[:0] = [{repo!r}, *{tests!r}]
    from cdi.data.collection import ImageCollection
    from cdi.engine.distributed import RayRunner
    from cdi.features.extract import extract_features
    from test_distributed import logged
    from test_extract import load_float64
    from pathlib import Path

    images, store, model, address, log, hang_on, hanging = sys.argv[1:]
    runner = RayRunner(functools.partial(load_float64, model), address=address, workers=2, threads=1,
                       device="cpu")
    adapter = load_float64(model)
    runner.start(adapter)
    print("workers ready", flush=True, file=sys.stderr)
    extract_features(adapter, ImageCollection.from_folder(images),
                     logged(Path(log), hang_on=hang_on, hanging=Path(hanging)), seed=3, batch_size={batch},
                     store=store, progress=False, runner=runner)
"""


def test_killed_driver_resumes_computing_only_what_is_missing(ray_instance, adapter, collection, reference,
                                                              images, tiny_model_dirs, tmp_path):
    store_path, log, hanging = tmp_path / "store.sqlite", tmp_path / "first.log", tmp_path / "hanging"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(KILLED_DRIVER.format(repo=str(REPO), tests=TEST_FOLDERS, batch=BATCH)))
    address = ray_instance.get_runtime_context().gcs_address
    # Batches 0..4 of two images; worker 1 hangs on batch 1 (and batch 3 waits behind it), worker 0
    # computes batches 0, 2 and 4: six images are stored when the driver is killed.
    hang_on = collection.hashes[2]
    proc = subprocess.Popen([sys.executable, str(script), str(images), str(store_path),
                             str(tiny_model_dirs["sd"]), address, str(log), hang_on, str(hanging)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # generous: a loaded machine starts processes slowly
        while time.monotonic() < deadline and proc.poll() is None:
            if hanging.exists() and store_path.exists():
                with FeatureStore(store_path) as store:
                    if store.count() == 3 * 6:
                        break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with FeatureStore(store_path) as store:
        assert store.count() == 3 * 6, f"after {time.monotonic() - deadline + 600:.0f} s: " + proc.stderr.read()[-3000:]
    stored = set(collection.hashes[:2] + collection.hashes[4:6] + collection.hashes[8:])
    resumed_log = tmp_path / "resumed.log"
    with float64_runner(tiny_model_dirs) as runner:
        table = extract_features(adapter, collection, logged(resumed_log), seed=3, batch_size=BATCH,
                                 store=store_path, progress=False, runner=runner)
    done = computed(resumed_log)
    for family in resolve_features(CHEAP):
        assert sorted(done[family.name]) == sorted(set(collection.hashes) - stored)  # only what was missing
    assert table.values.tobytes() == reference.values.tobytes()


def test_cli_ray_matches_the_plain_cli(ray_instance, images, tiny_model_dirs, tmp_path):
    """`cdi extract --ray` (float32 model) writes the table a run without Ray writes."""
    runner = CliRunner()
    common = ["extract", "--images", str(images), "--model", str(tiny_model_dirs["sd"]), "--features", "pia",
              "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    plain = runner.invoke(app, [*common, "--out", str(tmp_path / "plain.csv")])
    assert plain.exit_code == 0, plain.output
    distributed = runner.invoke(app, [*common, "--out", str(tmp_path / "ray.csv"), "--ray", "local",
                                      "--ray-workers", "2"])
    assert distributed.exit_code == 0, distributed.output
    a, b = FeatureTable.from_csv(tmp_path / "plain.csv"), FeatureTable.from_csv(tmp_path / "ray.csv")
    assert a.hashes == b.hashes
    np.testing.assert_allclose(b.values, a.values, rtol=2e-5, atol=1e-6)  # float32 rounding at most
    assert b.meta["extraction"]["distributed"]["workers"] == 2


def test_ray_options_are_checked_and_ray_is_optional(monkeypatch):
    with pytest.raises(CDIError, match="--ray-workers needs --ray"):
        check_ray_options(None, 2, 1, "auto", "float32")
    with pytest.raises(CDIError, match="at least 1"):
        check_ray_options("local", 0, 1, "auto", "float32")
    with pytest.raises(CDIError, match="cuda or auto"):
        check_ray_options("local", None, 1, "cuda:1", "float32")
    with pytest.raises(CDIError, match="bfloat16"):
        check_ray_options("local", None, 1, "auto", "fp16")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(CDIError, match=r"pip install 'cdi\[ray\]'"):
        check_ray_options("local", None, 1, "auto", "float32")
    check_ray_options(None, None, 1, "auto", "float32")  # without --ray, Ray is never imported
    code = ("import sys; sys.modules['ray'] = None\n"
            "import cdi.cli.main, cdi.audit.run, cdi.engine.distributed, cdi.features.extract\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(cdi.cli.main.app, ['extract', '--help'])\n"
            "assert r.exit_code == 0 and '--ray' in r.output, r.output\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
