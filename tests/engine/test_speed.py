"""``cdi speed``: the report's keys and their consistency, and its input checks (no timing assertions)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdi.cli.main import app
from cdi.utils.errors import CDIError
from cdi.engine.batching import parse_batch_size
from cdi.engine.speed import _entry, synthetic_images
from cdi.features.base import Cost
from cdi.features.registry import FEATURE_SETS

runner = CliRunner()

TIMING_KEYS = {"images_per_second", "calls_per_image", "measured_seconds", "roofline_seconds", "efficiency"}


@pytest.fixture(scope="module")
def cdi_report(tiny_model_dirs) -> dict:
    result = runner.invoke(app, ["speed", "--model", str(tiny_model_dirs["sd"]), "--device", "cpu",
                                 "--features", "cdi", "--format", "json", "--images", "8"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_report_has_every_key_with_sane_values(cdi_report):
    report = cdi_report
    for key in ("images_per_second", "efficiency", "calls_per_image", "peak_memory_bytes", "families",
                "roofline_seconds", "measured_seconds", "device", "dtype", "batch_size", "images",
                "audit_estimate_seconds"):
        assert key in report, key
    assert report["images"] == 8
    # auto on CPU: the fastest batch of the bare forward loop, a power of two
    assert report["batch_size"] in {2**k for k in range(9)}
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["images_per_second"] > 0
    assert report["calls_per_image"] == {"forward": 43, "backward": 14}  # the reference's 56 + 15, shared
    assert 0 < report["efficiency"] <= 1.5
    assert report["measured_seconds"] > 0 and report["roofline_seconds"] > 0
    assert math.isclose(report["images_per_second"], 8 / report["measured_seconds"])
    assert math.isclose(report["efficiency"], report["roofline_seconds"] / report["measured_seconds"])
    assert math.isclose(report["audit_estimate_seconds"], 2 * 1000 * report["measured_seconds"] / 8)
    assert report["peak_memory_bytes"]["host"] > 2**20 and report["peak_memory_bytes"]["device"] is None
    assert report["roofline"]["forward_seconds_per_call"] > 0 and report["roofline"]["backward_seconds_per_call"] > 0


def test_every_family_has_its_own_entry(cdi_report):
    families = cdi_report["families"]
    assert list(families) == FEATURE_SETS["cdi"]
    for name, entry in families.items():
        assert set(entry) == TIMING_KEYS, name
        assert entry["images_per_second"] > 0 and entry["efficiency"] >= 0, name
        # A family's extract is part of the whole run.
        assert entry["measured_seconds"] < cdi_report["measured_seconds"], name
    # A family's entry counts the calls of its own extract; the shared calls have their own entry.
    shared = cdi_report["shared_calls"]
    assert set(shared) == TIMING_KEYS and shared["calls_per_image"] == {"forward": 11, "backward": 10}
    entries = [*families.values(), shared]
    assert sum(e["calls_per_image"]["forward"] for e in entries) == 43
    assert sum(e["calls_per_image"]["backward"] for e in entries) == 14
    assert math.isclose(sum(e["roofline_seconds"] for e in entries), cdi_report["roofline_seconds"])
    assert families["denoising_loss"]["calls_per_image"] == {"forward": 4, "backward": 0}
    assert families["multiple_loss"]["calls_per_image"] == {"forward": 0, "backward": 0}
    assert families["gradient_masking"]["calls_per_image"] == {"forward": 10, "backward": 0}


def test_text_output_is_a_table(tiny_model_dirs):
    result = runner.invoke(app, ["speed", "--model", str(tiny_model_dirs["ddpm_uncond"]), "--device", "cpu",
                                 "--features", "denoising_loss", "--images", "2", "--batch-size", "2",
                                 "--audit-size", "10"])
    assert result.exit_code == 0, result.output
    for text in ("denoising_loss", "all", "efficiency", "2 x 10 images", "peak memory"):
        assert text in result.stdout, text


@pytest.mark.parametrize("value", ["0", "-3", "abc", "2.5", ""])
def test_bad_batch_size_exits_2(tiny_model_dirs, value):
    result = runner.invoke(app, ["speed", "--model", str(tiny_model_dirs["sd"]), "--device", "cpu",
                                 "--batch-size", value])
    assert result.exit_code == 2, result.output
    assert "--batch-size" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["--format", "yaml"], ["--images", "0"], ["--audit-size", "0"],
                                  ["--features", "nope"]])
def test_bad_options_exit_2(tiny_model_dirs, args):
    result = runner.invoke(app, ["speed", "--model", str(tiny_model_dirs["sd"]), "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert "error" in result.stderr.lower() and "Traceback" not in result.output


def test_parse_batch_size():
    assert parse_batch_size("auto") == "auto" and parse_batch_size(" AUTO ") == "auto"
    assert parse_batch_size("16") == 16 and parse_batch_size(3) == 3
    with pytest.raises(CDIError, match="at least 1"):
        parse_batch_size("0")


def test_synthetic_images_are_seeded_distinct_and_captioned(tmp_path):
    a = synthetic_images(tmp_path / "a", 3, 12, 3, seed=5)
    b = synthetic_images(tmp_path / "b", 3, 12, 3, seed=5)
    grey = synthetic_images(tmp_path / "g", 1, 12, 1)
    pixels = [np.asarray(Image.open(a / f"image_{i:05d}.png")) for i in range(3)]
    assert pixels[0].shape == (12, 12, 3)
    assert not np.array_equal(pixels[0], pixels[1])
    assert np.array_equal(pixels[2], np.asarray(Image.open(b / "image_00002.png")))
    assert (a / "image_00001.txt").read_text().strip() == "synthetic image 1"
    assert np.asarray(Image.open(grey / "image_00000.png")).shape == (12, 12)
    with pytest.raises(CDIError):
        synthetic_images(tmp_path / "none", 0, 12, 3)


def test_roofline_counts_backward_calls_once():
    # 5 forward calls of which 2 carry a backward: 3 plain forwards + 2 forward+backward.
    entry = _entry(Cost(5, 2), images=4, measured=10.0, per_forward=0.1, per_backward=0.3)
    assert math.isclose(entry["roofline_seconds"], 4 * (3 * 0.1 + 2 * 0.3))
    assert math.isclose(entry["efficiency"], entry["roofline_seconds"] / 10.0)
    assert entry["calls_per_image"] == {"forward": 5, "backward": 2}
    # No backward calls: an unmeasured backward time does not enter.
    forward_only = _entry(Cost(3, 0), images=2, measured=1.0, per_forward=0.1, per_backward=float("nan"))
    assert math.isclose(forward_only["roofline_seconds"], 0.6)


# ------------------------------------------------------------ the memory planner (cdi.engine.memory_plan)
def _profiled_peak(call, backward: bool) -> int:
    """Peak bytes the CPU allocator held for ``call`` (and its backward), from the profiler's memory events.

    Independent of the planner's count: the real kernels run on real tensors, and every allocation and
    free the profiler records is summed in time order.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.set_grad_enabled(backward):
            out = call()
            if backward:
                out.float().sum().backward()
            del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("key", ["sd", "sdxl", "sd3"])
def test_planned_activations_match_the_measured_peak_within_20_percent(tiny_model_dirs, tiny_flow_dirs, key):
    """The meta-device trace against the CPU allocator's peak of the same denoiser call with backward.

    Measured (profiler, float32, batch 1): planned / measured 1.03 (sd), 1.05 (sdxl), 1.03 (sd3).
    """
    import diffusers
    import torch

    from cdi.engine.memory_plan import _DENOISERS, _denoiser_call, build_on_meta, spec_from_folder, trace_peak

    folder = {**tiny_model_dirs, **tiny_flow_dirs}[key]
    spec = spec_from_folder(folder)
    name = next(n for n in _DENOISERS if n in spec.components)
    cls, config = spec.components[name]
    planned = trace_peak(_denoiser_call(spec, build_on_meta(cls, config, torch.float32), torch.float32, 1,
                                        grad=True), backward=True)
    real = getattr(diffusers, cls).from_pretrained(folder / name).float().eval().requires_grad_(False)
    torch.manual_seed(0)
    measured = _profiled_peak(_denoiser_call(spec, real, torch.float32, 1, grad=True), backward=True)
    assert 0.8 <= planned / measured <= 1.2, (planned, measured)


def test_plan_counts_the_published_flux_parameters_and_its_caption_cache():
    """FLUX.1-dev from its published configs: 11.9 B transformer and 4.76 B T5-XXL parameters (the model
    card's 12 B; T5-XXL's encoder), 4 MiB per caption in bfloat16 (512 x 4096 + 768 values)."""
    import torch

    from cdi.engine.memory_plan import GiB, PUBLISHED, plan_memory

    plan = plan_memory(PUBLISHED["flux-dev"], model="flux-dev", dtype=torch.bfloat16, device="cuda",
                       features=FEATURE_SETS["cdi+clid+sima"], images=2000, captions_per_image=4,
                       device_memory=80 * GiB, trace=False)
    assert round(plan.parameters["transformer"] / 1e9, 2) == 11.90
    assert round(plan.parameters["text_encoder_2"] / 1e9, 2) == 4.76
    assert plan.weights["transformer"] == 2 * plan.parameters["transformer"]  # bfloat16
    assert plan.weights["vae"] == 4 * plan.parameters["vae"]  # the autoencoder stays float32
    assert plan.caption_cache_per_caption == 2 * (512 * 4096 + 768)
    assert "activations not traced" in plan.summary()


def test_speed_plan_prints_the_plan_without_loading(tiny_flow_dirs, monkeypatch):
    import cdi.models.loading

    monkeypatch.setattr(cdi.models.loading, "load_model", lambda *a, **k: pytest.fail("--plan loaded the model"))
    result = runner.invoke(app, ["speed", "--model", str(tiny_flow_dirs["flux_dev"]), "--plan", "--device", "cuda",
                                 "--gpu-memory", "80", "--format", "json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dtype"] == "bfloat16"  # --dtype default on CUDA: FLUX's release dtype
    assert plan["fits"] is True and plan["largest_family"] == "noise_optimization"
    assert plan["denoiser_backward_per_sample"] > plan["denoiser_forward_per_sample"] > 0
    assert plan["peak"] == max(plan["caption_phase"], plan["denoising_phase"]) + plan["cuda_overhead"]
    tiny = runner.invoke(app, ["speed", "--model", str(tiny_flow_dirs["flux_dev"]), "--plan", "--device", "cuda",
                               "--gpu-memory", "0.001"])
    assert tiny.exit_code == 0 and "DOES NOT FIT" in tiny.output
    hub = runner.invoke(app, ["speed", "--model", "someone/not-local", "--plan"])
    assert hub.exit_code == 2 and "no configs" in hub.output


def test_an_audit_that_cannot_fit_stops_naming_the_options(tiny_flow_dirs):
    from cdi.engine.memory_plan import check_fits, plan_for

    plan = plan_for(str(tiny_flow_dirs["flux_dev"]), device="cuda", dtype="float32", gpu_memory_gib=0.001)
    with pytest.raises(CDIError, match=r"DOES NOT FIT.*--dtype bfloat16.*--features denoising_loss,secmi,pia,"
                                       r"multiple_loss,clid,sima"):
        check_fits(plan)
    check_fits(plan_for(str(tiny_flow_dirs["flux_dev"]), device="cuda", gpu_memory_gib=80))  # fits: no error
    gsa = plan_for(str(tiny_flow_dirs["flux_dev"]), device="cuda", features="cdi,gsa1", gpu_memory_gib=0.001)
    assert gsa.weight_gradients == gsa.weights["transformer"] and gsa.gradient_checkpointing
    with pytest.raises(CDIError, match=r"drop GSA \(gsa1, gsa2\) from --features: it needs the gradient of every"):
        check_fits(gsa)
