"""LoRAs, replaced components and single-file checkpoints on tiny models built here (cdi.models.finetune)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from cdi.utils.errors import CDIError
from cdi.models import load_model
from cdi.models.finetune import LoraSpec, parse_components, parse_loras
from ldm_checkpoint import write_original_checkpoint  # tests/ is on sys.path under pytest

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
CONV = "down_blocks.0.resnets.0.conv1"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
TE_OUT = "text_model.encoder.layers.0.self_attn.out_proj"


def _module(model, name):
    modules = dict(model.named_modules())  # transformers >= 5.6 flattens CLIPTextModel (no "text_model.")
    return modules[name] if name in modules else modules[name.removeprefix("text_model.")]


def _delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """B @ A for a linear layer, or a conv's (out, rank) x (rank, in, kh, kw) product, as peft merges it."""
    if down.dim() == 4:
        return (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
    return up @ down


def _eps(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return adapter.eps(x, torch.tensor([50, 700]), adapter.conditions(["a 1", "b 2"]))


@pytest.fixture(scope="module")
def loras(tiny_model_dirs, tmp_path_factory):
    """A diffusers-format LoRA (peft, saved by save_lora_weights) and a kohya-style one, with their tensors."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("loras")
    base = load_model(str(tiny_model_dirs["sd"]), device="cpu")
    unet = base.unet
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "conv1"]),
                     adapter_name="t")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="t"))
    StableDiffusionPipeline.save_lora_weights(root / "diffusers", unet_lora_layers=layers, safe_serialization=True)

    g = torch.Generator().manual_seed(2)
    kohya = {}
    # kohya-ss names SD 1.x UNet layers by their diffusers path with "_" for "."; real files always hold the
    # attention output projections (diffusers' format detection looks for them).
    for prefix, name, shape in (("lora_unet_", Q, (16, 16)), ("lora_unet_", OUT, (16, 16)),
                                ("lora_te_", TE_Q, (32, 32)), ("lora_te_", TE_OUT, (32, 32))):
        key = prefix + name.replace(".", "_")
        kohya[f"{key}.lora_down.weight"] = torch.randn(4, shape[1], generator=g) * 0.1
        kohya[f"{key}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g) * 0.1
        kohya[f"{key}.alpha"] = torch.tensor(2.0)
    (root / "kohya").mkdir()
    save_file(kohya, str(root / "kohya" / "style_v1.safetensors"))
    return {"diffusers": (root / "diffusers" / "pytorch_lora_weights.safetensors", layers),
            "kohya": (root / "kohya" / "style_v1.safetensors", kohya)}


def test_diffusers_lora_is_fused_as_w_plus_scale_alpha_over_r_b_a(tiny_model_dirs, tiny_adapters, loras):
    path, layers = loras["diffusers"]
    base = tiny_adapters["sd"]
    adapter = load_model(str(tiny_model_dirs["sd"]), device="cpu", loras=parse_loras([str(path.parent)], [0.7]))
    for name in (Q, CONV):
        down, up = (next(v for k, v in layers.items() if k.startswith(name + ".") and any(w in k for w in words))
                    for words in (("lora.down", "lora_A"), ("lora.up", "lora_B")))
        # diffusers-format files carry no alpha: loaded with alpha = rank, as the training scripts train them
        expected = _module(base.unet, name).weight + 0.7 * _delta(up, down)
        torch.testing.assert_close(_module(adapter.unet, name).weight, expected, rtol=1e-5, atol=1e-6)
    assert not any("lora" in n for n, _ in adapter.unet.named_parameters())  # fused, layers removed
    assert not torch.allclose(_eps(adapter), _eps(base))
    record = adapter.describe()
    assert record["loras"][0]["scale"] == 0.7 and len(record["loras"][0]["sha256"]) == 64
    assert record["base_fingerprint"] == base.fingerprint != record["fingerprint"]


def test_kohya_lora_reaches_unet_and_text_encoder(tiny_model_dirs, tiny_adapters, loras):
    path, kohya = loras["kohya"]
    base = tiny_adapters["sd"]
    adapter = load_model(str(tiny_model_dirs["sd"]), device="cpu", loras=[LoraSpec(path, 1.5)])
    for model_name, prefix, name in (("unet", "lora_unet_", Q), ("unet", "lora_unet_", OUT),
                                     ("text_encoder", "lora_te_", TE_Q), ("text_encoder", "lora_te_", TE_OUT)):
        key = prefix + name.replace(".", "_")
        scale = 1.5 * float(kohya[f"{key}.alpha"]) / 4
        delta = scale * kohya[f"{key}.lora_up.weight"] @ kohya[f"{key}.lora_down.weight"]
        before = _module(getattr(base, model_name), name).weight
        torch.testing.assert_close(_module(getattr(adapter, model_name), name).weight, before + delta,
                                   rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_eps(adapter), _eps(base))


def test_fingerprint_follows_the_lora_file_and_scale_not_its_path(tiny_model_dirs, loras, tmp_path):
    folder = str(tiny_model_dirs["sd"])
    d_path, k_path = loras["diffusers"][0], loras["kohya"][0]
    copy = tmp_path / "renamed.safetensors"
    shutil.copyfile(d_path, copy)
    prints = {
        "d1": load_model(folder, device="cpu", loras=[LoraSpec(d_path, 1.0)]).fingerprint,
        "d_half": load_model(folder, device="cpu", loras=[LoraSpec(d_path, 0.5)]).fingerprint,
        "k1": load_model(folder, device="cpu", loras=[LoraSpec(k_path, 1.0)]).fingerprint,
        "both": load_model(folder, device="cpu", loras=[LoraSpec(d_path, 1.0), LoraSpec(k_path, 1.0)]).fingerprint,
    }
    assert len(set(prints.values())) == len(prints)
    assert load_model(folder, device="cpu", loras=[LoraSpec(copy, 1.0)]).fingerprint == prints["d1"]


def test_replaced_unet_is_loaded_and_recorded(tiny_model_dirs, tiny_adapters, tmp_path):
    from cdi.models import tiny

    other = tiny.save_tiny_sd(tmp_path / "other", seed=5)
    adapter = load_model(str(tiny_model_dirs["sd"]), device="cpu", components=parse_components(None, str(other / "unet")))
    finetune = load_model(str(other), device="cpu")
    for key, value in finetune.unet.state_dict().items():
        assert torch.equal(adapter.unet.state_dict()[key], value), key
    assert not torch.allclose(_eps(adapter), _eps(tiny_adapters["sd"]))
    assert adapter.describe()["replaced_components"]["unet"]["fingerprint"]
    assert adapter.fingerprint not in (tiny_adapters["sd"].fingerprint, finetune.fingerprint)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_checkpoint_gives_the_folders_eps_offline(family, tiny_model_dirs, tmp_path, monkeypatch):
    from cdi.models import tiny

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The real SDXL's two text encoders differ in width (768, 1280); diffusers tells them apart by it.
    folder = tiny_model_dirs["sd"] if family == "sd" else tiny.save_tiny_sdxl(tmp_path / "xl", second_width=48)
    checkpoint = write_original_checkpoint(folder, tmp_path / f"{family}.safetensors")
    plain = load_model(str(folder), device="cpu")
    single = load_model(str(checkpoint), device="cpu", config=str(folder))
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(single.encode(pixels), plain.encode(pixels), rtol=0, atol=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 600])
    torch.testing.assert_close(single.eps(x, t, single.conditions(["a 1", "b 2"])),
                               plain.eps(x, t, plain.conditions(["a 1", "b 2"])), rtol=0, atol=0)
    record = single.describe()["single_file"]
    assert len(record["sha256"]) == 64 and record["config"] == str(folder)


def test_single_file_errors_are_explained(tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    checkpoint = write_original_checkpoint(tiny_model_dirs["sd"], tmp_path / "model.safetensors")
    with pytest.raises(CDIError, match="not available offline.*--config"):
        load_model(str(checkpoint), device="cpu")  # the guessed SD 1.5 configs are not cached here
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(CDIError, match="--allow-pickle"):
        load_model(str(pickle), device="cpu", config=str(tiny_model_dirs["sd"]))
    with pytest.raises(CDIError, match="--config applies to single-file"):
        load_model(str(tiny_model_dirs["sd"]), device="cpu", config=str(tiny_model_dirs["sd"]))


def test_lora_options_are_checked_before_loading(tmp_path):
    lora = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, str(lora))
    assert parse_loras([str(lora), str(lora)], [0.5]) == [LoraSpec(lora.resolve(), 0.5)] * 2
    with pytest.raises(CDIError, match="one per LoRA"):
        parse_loras([str(lora)] * 3, [0.5, 1.0])
    with pytest.raises(CDIError, match="without --lora"):
        parse_loras([], [1.0])
    with pytest.raises(CDIError, match="does not exist"):
        parse_loras([str(tmp_path / "missing.safetensors")], None)
    (tmp_path / "b.ckpt").write_bytes(b"")
    with pytest.raises(CDIError, match="--allow-pickle"):
        parse_loras([str(tmp_path / "b.ckpt")], None)
    with pytest.raises(CDIError, match="NAME=FOLDER"):
        parse_components(["unet"])


# ------------------------------------------------------------ a LoRA loads completely or the audit stops
def _kohya_dora_and_stray(kohya: dict, folder) -> dict:
    """The two files of issue 23's probe: kohya DoRA (``dora_scale`` per layer) and one key for a missing block."""
    g = torch.Generator().manual_seed(3)
    dora = dict(kohya)
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:
        out = kohya[key.replace("lora_down", "lora_up")].shape[0]
        dora[key.replace("lora_down.weight", "dora_scale")] = 1 + 0.1 * torch.randn(out, 1, generator=g)
    stray = dict(kohya)
    # the tiny UNet has two down blocks: down_blocks_3 does not exist
    bad = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    stray.update({f"{bad}.lora_down.weight": torch.randn(4, 16, generator=g),
                  f"{bad}.lora_up.weight": torch.randn(16, 4, generator=g), f"{bad}.alpha": torch.tensor(2.0)})
    files = {}
    for name, tensors in (("dora", dora), ("stray", stray)):
        files[name] = folder / f"{name}.safetensors"
        save_file(tensors, str(files[name]))
    return files


def test_a_lora_with_unused_keys_is_refused_naming_them(tiny_model_dirs, loras, tmp_path):
    files = _kohya_dora_and_stray(loras["kohya"][1], tmp_path)
    # DoRA: refused from the file's header, before the model loads
    with pytest.raises(CDIError, match=r"DoRA.*4 magnitude keys.*lora_te_text_model.*dora_scale"):
        parse_loras([str(files["dora"])], None)
    # a key for a block the model lacks: diffusers only logs it; the value match finds it
    with pytest.raises(CDIError, match=r"2 of the 15 tensors.*lora_unet_down_blocks_3_attentions_0_transformer_blocks"
                                       r"_0_attn1_to_q.lora_down.weight, lora_unet_down_blocks_3.*lora_up.weight"):
        load_model(str(tiny_model_dirs["sd"]), device="cpu", loras=parse_loras([str(files["stray"])], None))
    # the complete file: its record counts the tensors and the weights they changed (4 layers)
    adapter = load_model(str(tiny_model_dirs["sd"]), device="cpu", loras=parse_loras([str(loras["kohya"][0])], None))
    record = adapter.describe()["loras"][0]
    assert record["tensors"] == 12 and record["weights_changed"] == 4


def test_cli_audit_with_a_dora_or_stray_key_lora_exits_2(tiny_model_dirs, loras, tmp_path):
    from typer.testing import CliRunner

    from PIL import Image

    from cdi.cli import app

    files = _kohya_dora_and_stray(loras["kohya"][1], tmp_path)
    for name in ("published", "unpublished"):
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.new("RGB", (16, 16), (20 * i, 10, 200 if name == "published" else 20)).save(
                tmp_path / name / f"{name}{i}.png")
    for name, needle in (("dora", "dora_scale"), ("stray", "lora_unet_down_blocks_3")):
        out = tmp_path / f"audit_{name}"
        result = CliRunner().invoke(app, [
            "audit", "--published", str(tmp_path / "published"), "--unpublished", str(tmp_path / "unpublished"),
            "--model", str(tiny_model_dirs["sd"]), "--lora", str(files[name]), "--out", str(out),
            "--features", "denoising_loss", "--folds", "2", "--permutations", "0", "--sample-size-resamples", "0",
            "--shift-encoder", "builtin", "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output
        assert not out.exists()
