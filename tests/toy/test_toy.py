"""The embedded toy world: layout, split, shift, models, membership signal, determinism."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cdi.toy import data as toy_data
from cdi.toy import training as toy_training
from cdi.toy import shipped
from cdi.toy import world as toy
from cdi.cli.main import app
from cdi.utils.errors import CDIError


@pytest.fixture(scope="module")
def sd_world(tmp_path_factory):
    """The sd-overtrained world, built once through the command line."""
    out = tmp_path_factory.mktemp("toy") / "sd"
    result = CliRunner().invoke(app, ["toy", "build", "--kind", "sd", "--strength", "overtrained",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "world.json").read_text())
    return toy.ToyWorld.at(out, info)


def _folder(folder):
    """(sorted png names, {file_name: caption}) of an imagefolder."""
    names = sorted(p.name for p in folder.glob("*.png"))
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return names, {line["file_name"]: line["text"] for line in lines}


def test_world_layout(sd_world):
    images, labels = toy_data.load_digit_images()
    expected = {"members": 898, "nonmembers": 899, "nonmembers_shifted": 899}
    seen = {}
    for name, count in expected.items():
        names, captions = _folder(sd_world.root / name)
        assert len(names) == count and sorted(captions) == names
        for file_name in names:
            match = re.fullmatch(r"digit_(\d{4})\.png", file_name)
            assert match, file_name
            assert captions[file_name] == toy_data.caption(labels[int(match.group(1))])
        seen[name] = set(names)
    assert not seen["members"] & seen["nonmembers"]
    assert len(seen["members"] | seen["nonmembers"]) == len(labels)
    assert seen["nonmembers_shifted"] == seen["nonmembers"]
    # Images are the upsampled digits, white on black, RGB 32 px.
    first = int(toy_data.split_members(labels, 0)[0][0])
    with Image.open(sd_world.members_dir / f"digit_{first:04d}.png") as image:
        assert image.mode == "RGB" and image.size == (32, 32)
        assert np.array_equal(np.asarray(image), images[first])
    info = sd_world.info
    assert (info["kind"], info["strength"], info["seed"], info["source"]) == ("sd", "overtrained", 0, "shipped")
    assert info["split"]["members"] == 898 and info["split"]["nonmembers"] == 899
    assert info["training"] == toy.TRAIN_CONFIGS[("sd", "overtrained")].to_dict()
    assert info["weights_sha256"] == info["shipped_weights_sha256"]
    assert set(info["weights_sha256"]) == {"unet.safetensors", "vae.safetensors", "text_encoder.safetensors"}
    assert info["cdi_version"] and info["image_size"] == 32


def test_pipeline_loads_with_diffusers(sd_world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_world.model_dir, local_files_only=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae.config.scaling_factor == sd_world.info["model"]["scaling_factor"]
    # A few denoising steps run end to end and give a 32 px image.
    image = pipe("a handwritten digit three", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def _per_image_loss(adapter, folder, t=100, repeats=5, batch_size=300):
    """Carlini et al.'s denoising loss through the adapter API: mean over seeded eps of ||eps_theta - eps||_2."""
    names, captions = _folder(folder)
    losses = []
    for start in range(0, len(names), batch_size):
        chunk = names[start:start + batch_size]
        pixels = torch.stack([
            torch.from_numpy(np.array(Image.open(folder / n).convert("RGB"))).permute(2, 0, 1)
            for n in chunk
        ]).float().div(127.5).sub(1.0)
        x0 = adapter.encode(pixels)
        cond = adapter.conditions([captions[n] for n in chunk])
        total = torch.zeros(len(chunk))
        for r in range(repeats):
            gen = torch.Generator().manual_seed(1000 * r + 7)
            eps = torch.stack([torch.randn(x0.shape[1:], generator=gen) for _ in chunk])
            steps = torch.full((len(chunk),), t, dtype=torch.long)
            with torch.no_grad():
                pred = adapter.eps(adapter.add_noise(x0, eps, steps), steps, cond)
            total += (pred - eps).flatten(1).norm(dim=1).cpu()
        losses.append(total / repeats)
    return torch.cat(losses).numpy()


def test_members_have_lower_denoising_loss(sd_world):
    from scipy import stats

    from cdi.models import load_model

    adapter = load_model(str(sd_world.model_dir), device="cpu", dtype="float32")
    assert adapter.family == "sd" and adapter.conditioning == "text"
    members = _per_image_loss(adapter, sd_world.members_dir)
    nonmembers = _per_image_loss(adapter, sd_world.nonmembers_dir)
    result = stats.ttest_ind(members, nonmembers, equal_var=False, alternative="less")
    assert result.pvalue < 1e-3, (members.mean(), nonmembers.mean(), result.pvalue)


def test_split_is_stratified_and_seeded():
    _, labels = toy_data.load_digit_images()
    members, nonmembers = toy_data.split_members(labels, seed=0)
    assert len(members) == 898 and len(nonmembers) == 899
    assert np.array_equal(np.sort(np.concatenate([members, nonmembers])), np.arange(len(labels)))
    per_class = np.bincount(labels[members], minlength=10)
    total = np.bincount(labels, minlength=10)
    assert np.all(np.abs(2 * per_class - total) <= 1)
    again, _ = toy_data.split_members(labels, seed=0)
    other, _ = toy_data.split_members(labels, seed=1)
    assert np.array_equal(members, again)
    assert not np.array_equal(members, other)


def _colour_cast(folder):
    """Mean of R - B over a folder's images (0 for grey images)."""
    values = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sorted(folder.glob("*.png"))]
    return np.array([(v[..., 0] - v[..., 2]).mean() for v in values])


def test_shifted_folder_differs_visibly(sd_world):
    names, captions = _folder(sd_world.nonmembers_dir)
    shifted_names, shifted_captions = _folder(sd_world.shifted_dir)
    assert shifted_names == names and shifted_captions == captions
    for name in names[:50]:
        a = np.asarray(Image.open(sd_world.nonmembers_dir / name))
        b = np.asarray(Image.open(sd_world.shifted_dir / name))
        assert a.shape == b.shape and not np.array_equal(a, b)
    # A one-number colour statistic separates the two folders perfectly.
    assert _colour_cast(sd_world.nonmembers_dir).max() < _colour_cast(sd_world.shifted_dir).min()


def test_write_shifted_images_fraction(sd_world, tmp_path):
    src = sd_world.nonmembers_dir
    names, _ = _folder(src)
    toy_data.write_shifted_images(src, tmp_path / "half", fraction=0.5, seed=3)
    changed = [n for n in names if (src / n).read_bytes() != (tmp_path / "half" / n).read_bytes()]
    assert len(changed) == round(0.5 * len(names))
    assert (tmp_path / "half" / "metadata.jsonl").read_bytes() == (src / "metadata.jsonl").read_bytes()
    toy_data.write_shifted_images(src, tmp_path / "half_again", fraction=0.5, seed=3)
    again = [n for n in names if (src / n).read_bytes() != (tmp_path / "half_again" / n).read_bytes()]
    assert again == changed
    toy_data.write_shifted_images(src, tmp_path / "none", fraction=0.0)
    assert all((src / n).read_bytes() == (tmp_path / "none" / n).read_bytes() for n in names)
    with pytest.raises(CDIError, match="fraction"):
        toy_data.write_shifted_images(src, tmp_path / "bad", fraction=1.5)
    with pytest.raises(CDIError, match="not empty"):
        toy_data.write_shifted_images(src, tmp_path / "half", fraction=0.5)
    assert not (tmp_path / "bad").exists()


def test_rebuild_is_incremental(sd_world):
    before = (sd_world.root / "world.json").stat().st_mtime_ns
    world = toy.build_world("sd", "overtrained", sd_world.root, progress=False)
    assert (sd_world.root / "world.json").stat().st_mtime_ns == before
    assert world.info == sd_world.info


def test_ddpm_world_builds(tmp_path):
    from cdi.models import load_model

    result = CliRunner().invoke(app, ["toy", "build", "--kind", "ddpm", "--strength", "light",
                                      "--out", str(tmp_path / "ddpm"), "--quiet"])
    assert result.exit_code == 0, result.output
    world = toy.ToyWorld.at(tmp_path / "ddpm", json.loads((tmp_path / "ddpm" / "world.json").read_text()))
    labels = json.loads((world.model_dir / "labels.json").read_text())
    assert labels["null_class_id"] == 10 and labels["id2label"]["7"] == "a handwritten digit seven"
    adapter = load_model(str(world.model_dir), device="cpu", dtype="float32")
    assert adapter.family == "ddpm" and adapter.conditioning == "class"
    assert adapter.resolution == 32 and adapter.image_channels == 3
    x0 = torch.zeros(2, 3, 32, 32)
    t = torch.tensor([100, 100])
    conditional = adapter.eps(x0, t, adapter.conditions(["a handwritten digit seven"] * 2))
    null = adapter.eps(x0, t, adapter.null_condition(2))
    assert not torch.equal(conditional, null)


def test_flow_world_builds(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from cdi.models import load_model

    result = CliRunner().invoke(app, ["toy", "build", "--kind", "flow", "--out", str(tmp_path / "flow"), "--quiet"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "flow" / "world.json").read_text())
    assert info["model"]["pipeline"] == "StableDiffusion3Pipeline" and info["model"]["conditioning"] == "text"
    model_dir = tmp_path / "flow" / "model"
    StableDiffusion3Pipeline.from_pretrained(model_dir, local_files_only=True)  # an ordinary SD3 folder
    adapter = load_model(str(model_dir), device="cpu", dtype="float32")
    assert adapter.family == "sd3" and adapter.resolution == 32 and adapter.describe()["scheduler_shift"] == 3.0
    x0 = adapter.encode(torch.zeros(2, 3, 32, 32))
    assert x0.shape == (2, 4, 8, 8)
    t = torch.tensor([100, 100])
    conditional = adapter.eps(x0, t, adapter.conditions(["a handwritten digit seven"] * 2))
    assert not torch.equal(conditional, adapter.eps(x0, t, adapter.null_condition(2)))


def test_user_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["toy", "build", "--seed", "1", "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "--retrain" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["toy", "build", "--out", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "not a toy world" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(CDIError, match="kind"):
        toy.build_world("vae", "light", tmp_path / "x")


def test_shipped_weights_are_intact_and_small():
    names = sorted(p.name for p in shipped.WEIGHTS_ROOT.iterdir()
                   if (p / "training.json").is_file() and not p.name.startswith("sd-lora-"))  # cdi.toy.lora
    assert names == sorted(f"{kind}-{strength}" for kind, strength in toy.TRAIN_CONFIGS)
    total = 0
    for name in names:
        kind, strength = name.split("-")
        folder = shipped.weights_dir(kind, strength)
        weights, meta = shipped.load_weights(folder)  # checks every SHA-256
        assert meta["config"] == toy.TRAIN_CONFIGS[(kind, strength)].to_dict()
        assert meta["seed"] == 0 and weights.kind == kind
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total < 20 * 2**20


@pytest.mark.parametrize("kind", toy_training.KINDS)
def test_training_is_deterministic(kind):
    images, labels = toy_data.load_digit_images()
    config = toy_training.TrainConfig(epochs=1, lr=1e-3, batch_size=8, vae_epochs=1, vae_batch_size=8)
    subset = slice(0, 16)
    first = toy.train_model(kind, images[subset], labels[subset], config, seed=0)
    second = toy.train_model(kind, images[subset], labels[subset], config, seed=0)
    other = toy.train_model(kind, images[subset], labels[subset], config, seed=1)
    assert first.state_dicts.keys() == second.state_dicts.keys()
    for name, state in first.state_dicts.items():
        for key, value in state.items():
            assert torch.equal(value, second.state_dicts[name][key]), (name, key)
    assert first.scaling_factor == second.scaling_factor
    denoiser = "transformer" if kind == "flow" else "unet"
    assert any(not torch.equal(v, other.state_dicts[denoiser][k]) for k, v in first.state_dicts[denoiser].items())
