"""Test helper: write a diffusers SD / SDXL pipeline folder as one single-file checkpoint in the original layout.

diffusers 0.42.1 converts original (CompVis LDM / Stability SGM) checkpoints
*to* diffusers (``from_single_file``) but ships no converter the other way
(the repository's ``scripts/convert_diffusers_to_original_stable_diffusion.py``
is not installed, and assumes SD 1.5's block counts). This is the inverse of
``diffusers.loaders.single_file_utils``'s key mapping, generic over the
number of blocks and ``layers_per_block``, for the parts the tiny test
pipelines have:

* UNet -> ``model.diffusion_model.``: ``input_blocks`` / ``middle_block`` /
  ``output_blocks`` with ``in_layers`` / ``emb_layers`` / ``out_layers`` /
  ``skip_connection`` resnets; SDXL's ``add_embedding`` -> ``label_emb.0``.
* VAE -> ``first_stage_model.``: ``encoder.down.i.block.j``, the decoder's
  ``up`` blocks in reverse order, ``mid.attn_1`` with 1x1-conv q/k/v/proj_out.
* SD text encoder -> ``cond_stage_model.transformer.`` + the transformers
  keys; SDXL: ``conditioner.embedders.0.transformer.`` and, for the second
  encoder, OpenCLIP keys under ``conditioner.embedders.1.model.`` (fused
  ``in_proj`` q/k/v, ``text_projection`` transposed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_original(state: dict, config: dict) -> dict:
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    for i in range(n):
        for j in range(layers):
            k = i * (layers + 1) + j + 1
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        names[f"up_blocks.{i}.upsamplers.0.conv"] = \
            f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention else 1}.conv"
    out = {}
    for key, value in state.items():
        match = max((p for p in names if key.startswith(p + ".")), key=len)
        rest = key[len(match) + 1:]
        if ".resnets." in match:
            head, _, tail = rest.partition(".")
            rest = f"{RESNET[head]}.{tail}"
        out[f"model.diffusion_model.{names[match]}.{rest}"] = value
    return out


def vae_to_original(state: dict, config: dict) -> dict:
    n = len(config["block_out_channels"])
    names = {"encoder.conv_in": "encoder.conv_in", "encoder.conv_out": "encoder.conv_out",
             "encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_in": "decoder.conv_in",
             "decoder.conv_out": "decoder.conv_out", "decoder.conv_norm_out": "decoder.norm_out",
             "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        names[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        names[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        names[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(n):
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
        for j in range(config["layers_per_block"] + 1):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        match = max((p for p in names if key.startswith(p + ".")), key=len)
        rest = key[len(match) + 1:]
        if match.endswith("attentions.0"):
            head = max((a for a in attention if rest.startswith(a + ".")), key=len)
            rest = attention[head] + rest[len(head):]
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif ".resnets." in match:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        out[f"first_stage_model.{names[match]}.{rest}"] = value
    return out


def open_clip_from_transformers(state: dict, layers: int) -> dict:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP's key layout."""
    p = "text_model."
    out = {"token_embedding.weight": state[p + "embeddings.token_embedding.weight"],
           "positional_embedding": state[p + "embeddings.position_embedding.weight"],
           "ln_final.weight": state[p + "final_layer_norm.weight"],
           "ln_final.bias": state[p + "final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T.contiguous()}
    for i in range(layers):
        src, dst = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"], dim=0)
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def write_original_checkpoint(folder: Path, path: Path) -> Path:
    """The SD or SDXL pipeline in ``folder`` as one ``.safetensors`` file in the original layout."""
    folder = Path(folder)

    def weights(component: str) -> dict:
        found = sorted((folder / component).glob("*.safetensors"))
        state = load_file(str(found[0]))
        if component.startswith("text_encoder"):  # transformers 5 saves CLIP keys without "text_model."
            state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                     for k, v in state.items()}
        return state

    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    state = {**unet_to_original(weights("unet"), config("unet")), **vae_to_original(weights("vae"), config("vae"))}
    text = {k: v for k, v in weights("text_encoder").items() if "position_ids" not in k}
    if (folder / "text_encoder_2").is_dir():
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()})
        second = open_clip_from_transformers(weights("text_encoder_2"), config("text_encoder_2")["num_hidden_layers"])
        state.update({f"conditioner.embedders.1.model.{k}": v for k, v in second.items()})
    else:
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
