"""The command line for the people who run it: help, version, choices, JSON output,
shared loader options, exit codes and progress lines in logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdi.audit.config import AuditConfig, reproduce_command
from cdi.cli.main import app
from cdi.utils.errors import CDIError
from cdi.models.loading import resolve_dtype

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
LOADING_COMMANDS = ("extract", "audit", "speed", "benchmark")
LOADER_FLAGS = ("--device", "--dtype", "--revision", "--variant", "--allow-pickle", "--compile",
                "--local-files-only", "--cache-dir", "--token", "--lora", "--lora-scale", "--unet", "--component",
                "--config")


def test_short_help_and_version():
    top = runner.invoke(app, ["-h"])
    assert top.exit_code == 0 and "audit" in top.stdout and "Exit status" in top.stdout
    sub = runner.invoke(app, ["audit", "-h"])
    assert sub.exit_code == 0 and "--published" in sub.stdout
    version = runner.invoke(app, ["-V"])
    assert version.exit_code == 0 and version.stdout.startswith("cdi ")


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_loading_command_has_the_same_loader_options(command):
    text = runner.invoke(app, [command, "--help"], terminal_width=200).stdout
    for flag in LOADER_FLAGS:
        assert flag in text, f"cdi {command} lacks {flag}"
    if command in ("audit", "benchmark"):
        assert "--alpha" in text
    assert ("--reference-model" in text) == (command in ("audit", "benchmark"))
    assert "--format" in text


def _loading_command(command, tmp_path):
    """The arguments of a ``command`` that would load the model ``m``, all else valid."""
    return {
        "extract": ["extract", "--images", str(tmp_path), "--model", "m", "--out", str(tmp_path / "f.csv")],
        "audit": ["audit", "--published", str(tmp_path), "--unpublished", str(tmp_path), "--model", "m",
                  "--out", str(tmp_path / "out")],
        "speed": ["speed", "--model", "m"],
        "benchmark": ["benchmark", "--members", str(tmp_path), "--nonmembers", str(tmp_path), "--model", "m",
                      "--out", str(tmp_path / "b")],
    }[command]


@pytest.mark.parametrize("command", LOADING_COMMANDS)
@pytest.mark.parametrize("options, message", [
    (["--lora-scale", "0.5"], "without --lora"),
    (["--lora", "missing.safetensors"], "does not exist"),
    (["--component", "unet"], "NAME=FOLDER"),
    (["--unet", "no/such/folder"], "does not exist"),
])
def test_bad_fine_tune_options_exit_2_before_any_model_loads(monkeypatch, tmp_path, command, options, message):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("cdi.models.load_model", no_load)
    result = runner.invoke(app, _loading_command(command, tmp_path) + options)
    assert result.exit_code == 2 and message in result.stderr, result.output


@pytest.mark.parametrize("command", ("audit", "benchmark"))
def test_an_empty_reference_model_exits_2(monkeypatch, tmp_path, command):
    monkeypatch.setattr("cdi.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    result = runner.invoke(app, _loading_command(command, tmp_path) + ["--reference-model", " "])
    assert result.exit_code == 2 and "--reference-model is empty" in result.stderr, result.output


def test_loader_options_reach_load_model(monkeypatch):
    seen = {}

    def fake_load_model(name, **kwargs):
        seen.update(kwargs, name=name)
        raise CDIError("stop here")

    monkeypatch.setattr("cdi.models.load_model", fake_load_model)
    result = runner.invoke(app, ["speed", "--model", "some/model", "--device", "CPU", "--dtype", "AUTO",
                                 "--revision", "abc", "--variant", "fp16", "--allow-pickle",
                                 "--local-files-only", "--cache-dir", "/tmp/hf", "--token", "hf_x"])
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen == {"name": "some/model", "device": "CPU", "dtype": "auto", "revision": "abc", "variant": "fp16",
                    "allow_pickle": True, "compile": False, "local_files_only": True, "cache_dir": "/tmp/hf",
                    "token": "hf_x", "loras": [], "components": {}, "config": None, "guidance_scale": None,
                    "timestep_grid": None}
    seen.clear()
    runner.invoke(app, ["speed", "--model", "m"])
    assert seen["local_files_only"] is None and seen["token"] is None  # None: follow HF_HUB_OFFLINE / HF_TOKEN


def test_fine_tune_options_reach_load_model(monkeypatch, tmp_path):
    from cdi.models.finetune import LoraSpec

    seen = {}

    def fake_load_model(name, **kwargs):
        seen.update(kwargs, name=name)
        raise CDIError("stop here")

    monkeypatch.setattr("cdi.models.load_model", fake_load_model)
    import torch
    from safetensors.torch import save_file

    for name in ("a.safetensors", "b.safetensors"):  # a readable header: --lora checks it for DoRA keys
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    result = runner.invoke(app, ["speed", "--model", "base", "--lora", str(tmp_path / "a.safetensors"),
                                 "--lora", str(tmp_path / "b.safetensors"), "--lora-scale", "0.5",
                                 "--lora-scale", "2", "--unet", str(tmp_path / "unet"),
                                 "--component", f"vae={tmp_path / 'vae'}", "--config", "sd15"])
    assert result.exit_code == 2 and "stop here" in result.stderr, result.output
    assert seen["loras"] == [LoraSpec((tmp_path / "a.safetensors").resolve(), 0.5),
                             LoraSpec((tmp_path / "b.safetensors").resolve(), 2.0)]
    assert seen["components"] == {"unet": (tmp_path / "unet").resolve(), "vae": (tmp_path / "vae").resolve()}
    assert seen["config"] == "sd15"


def test_dtype_auto_is_float32_on_the_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("AUTO", torch.device("cpu")) == torch.float32


def test_the_token_is_never_recorded():
    config = AuditConfig("p", "u", "m", "out", token="hf_secret", cache_dir="/c", local_files_only=True)
    assert "hf_secret" not in reproduce_command(config) and "hf_secret" not in repr(config)
    assert "--cache-dir /c" in reproduce_command(config)


def test_choices_ignore_case_and_bad_choices_are_usage_errors():
    result = runner.invoke(app, ["models", "--format", "JSON"])
    assert result.exit_code == 0
    models = json.loads(result.stdout)
    assert models["aliases"] and models["families"]
    bad = runner.invoke(app, ["models", "--format", "xml"])
    assert bad.exit_code == 2 and "text, json" in bad.stderr
    unknown = runner.invoke(app, ["audit", "--no-such-option"])
    assert unknown.exit_code == 2


def test_inspect_prints_json(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    result = runner.invoke(app, ["inspect", "--published", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["published"]["images"] == 3


def test_an_internal_error_exits_1_and_saves_the_traceback(monkeypatch, capsys):
    class Broken(dict):
        def items(self):
            raise RuntimeError("something internal broke")

    monkeypatch.setattr("cdi.models.registry.FAMILIES", Broken())
    with pytest.raises(SystemExit) as exit_info:
        app(["models"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "something internal broke" in err
    path = Path(err.split("The traceback is in ")[1].split(";")[0].replace("\n", ""))
    try:
        assert "Traceback" in path.read_text() and "RuntimeError" in path.read_text()
    finally:
        path.unlink()


def test_extract_prints_json(tmp_path, tiny_model_dirs):
    from test_extract import write_images

    images = write_images(tmp_path / "images", n=3)
    result = runner.invoke(app, ["extract", "--images", str(images), "--model", str(tiny_model_dirs["sd"]),
                                 "--features", "denoising_loss", "--out", str(tmp_path / "f.csv"),
                                 "--batch-size", "2", "--workers", "0", "--format", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["images"] == 3 and info["csv"] == str(tmp_path / "f.csv") and info["extraction"]["seconds"] > 0


def test_extract_writes_progress_lines_to_a_log_before_it_finishes(tmp_path, tiny_model_dirs):
    """``cdi extract ... > log 2>&1``: plain progress lines reach the log while the run goes on."""
    from test_extract import write_images

    images = write_images(tmp_path / "images", n=16)
    log = tmp_path / "log"
    env = {**os.environ, "CDI_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from cdi.cli.main import app; app()", "extract", "--images", str(images),
               "--model", str(tiny_model_dirs["sd"]), "--features", "denoising_loss", "--out", str(tmp_path / "f.csv"),
               "--batch-size", "1", "--workers", "0", "--device", "cpu"]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        seen_while_running = None
        while process.poll() is None:
            text = log.read_text()
            if "extracting features:" in text and process.poll() is None:
                seen_while_running = text
                break
            time.sleep(0.02)
        process.wait(timeout=300)
    text = log.read_text()
    assert process.returncode == 0, text
    assert seen_while_running is not None, f"no progress line appeared before the run ended:\n{text}"
    lines = [line for line in text.splitlines() if line.startswith("extracting features:")]
    assert len(lines) >= 2
    assert "images/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("extracting features: 16/16 images (100%)") and "done in" in lines[-1]
    assert "\r" not in text and "\x1b[" not in text  # no bar redraws, no terminal codes
    assert "16 images x" in text  # the summary follows


def test_missing_xgboost_is_a_clear_input_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgboost" else real(name, *a))
    result = runner.invoke(app, ["audit", "--published", str(tmp_path), "--unpublished", str(tmp_path),
                                 "--model", "m", "--out", str(tmp_path / "out"), "--scorer", "XGBoost",
                                 "--protocol", "sequential"])
    assert result.exit_code == 2 and "cdi[xgboost]" in result.stderr and "xgboost-cpu" in result.stderr
    result = runner.invoke(app, ["benchmark", "--members", str(tmp_path), "--nonmembers", str(tmp_path),
                                 "--model", "m", "--out", str(tmp_path / "b"), "--methods", "loss,gsa1"])
    assert result.exit_code == 2 and "gsa1" in result.stderr and "cdi[xgboost]" in result.stderr
