"""Tiny flow-matching pipelines (SD3, FLUX.1, Z-Image) built from configs, for tests and the toy world.

Like ``cdi.models.tiny``: random weights seeded with ``torch.manual_seed``,
saved with ``save_pretrained`` (safetensors), loaded back by
``cdi.models.load_model`` through the path a user's checkpoint takes, offline.
Images are 16x16 px; the autoencoders have two levels (8x8 latents).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from cdi.models.tiny import _RESOLUTION, _save, _tiny_clip_config, build_char_clip_tokenizer

# Printable ASCII as sentencepiece-style pieces (with and without the word-start marker).
_CHARS = [chr(i) for i in range(33, 127)]


def build_char_t5_tokenizer(max_length: int = 32, words: tuple[str, ...] = ()):
    """A ``T5TokenizerFast`` with one piece per character (a Unigram model, no download).

    Lower-cases, marks word starts with ``"▁"`` as sentencepiece does, ends
    every sequence with ``</s>``; ``<pad>`` is id 0 as in T5. Each of
    ``words`` is also one piece (preferred over its characters).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    pieces += [("\u2581" + w, -1.0) for w in words if len(w) > 1]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(tokenizer, d_model: int = 32):
    """A 2-layer ``T5EncoderModel`` of width ``d_model`` over ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def tiny_flow_autoencoder(latent_channels: int, shift_factor: float = 0.1, scaling_factor: float = 1.5) -> AutoencoderKL:
    """A 2-level AutoencoderKL with SD3/FLUX's latent normalisation (``shift_factor``, ``scaling_factor``)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=_RESOLUTION, shift_factor=shift_factor, scaling_factor=scaling_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def save_tiny_sd3(folder: str | Path, seed: int = 0, with_t5: bool = True, shift: float = 3.0) -> Path:
    """A tiny SD3 pipeline: two CLIP encoders with projection (16 + 16), a T5 (32), an SD3 transformer.

    ``with_t5=False`` saves it without ``text_encoder_3``/``tokenizer_3``
    (null in model_index.json), as SD3 "without T5" checkpoints are.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_char_clip_tokenizer(), build_char_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, hidden_size=16))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, hidden_size=16))
    tokenizer_3 = build_char_t5_tokenizer() if with_t5 else None
    text_encoder_3 = tiny_t5_encoder(tokenizer_3) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=_RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, pos_embed_max_size=8,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_flow_autoencoder(4), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    return _save(pipeline, folder)


def save_tiny_flux(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1 pipeline: CLIP (pooled, 16) + T5 (32), a FluxTransformer2DModel on 2x2-packed latents.

    ``guidance_embeds=True`` is FLUX.1 dev's guidance-distilled layout,
    False is schnell's. The scheduler shifts by resolution as FLUX's does.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_char_clip_tokenizer(), build_char_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=tiny_flow_autoencoder(4), text_encoder=CLIPTextModel(_tiny_clip_config(tokenizer, 16)),
        tokenizer=tokenizer, text_encoder_2=tiny_t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _save(pipeline, folder)


def build_byte_qwen_tokenizer(max_length: int = 64):
    """A Qwen2 tokenizer over the 256 byte-level symbols (no merges) with a ChatML chat template.

    Stands in for Qwen3's tokenizer: same class, same special tokens for the
    chat template, ``<|endoftext|>`` as padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    qwen = Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, model_max_length=max_length)
    qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    qwen.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return qwen


def save_tiny_zimage(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Z-Image pipeline: a 2-layer Qwen3 text encoder (32 wide), a ZImageTransformer2DModel.

    The scheduler is Z-Image-Turbo's (static shift 3.0).
    """
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = build_byte_qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    ))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32],
    )
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_flow_autoencoder(4),
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    return _save(pipeline, folder)
