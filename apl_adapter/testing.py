"""Tiny real models for tests, docs and the demo (real classes, real configs, random weights)."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import CLIP_VOCAB_SIZE


def tiny_clip_text_config(
    hidden_size: int = 32, layers: int = 2, heads: int = 4, projection_dim: int = 32, pad_token_id: int = 49407
) -> CLIPTextConfig:
    """A CLIP text config with the real vocabulary and 77 positions but a tiny width and depth."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def tiny_clip_text_model(hidden_size: int = 32, seed: int = 0, with_projection: bool = False, **kwargs):
    """A seeded tiny ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) in eval mode."""
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(tiny_clip_text_config(hidden_size=hidden_size, **kwargs)).eval()


def sd15_text_config() -> CLIPTextConfig:
    """The real-size Stable Diffusion 1.x text encoder config (OpenAI CLIP ViT-L/14 text tower)."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 8, seed: int = 0, **extra):
    """A ~0.4 M-parameter ``UNet2DConditionModel`` (4 latent channels, two blocks)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    ).eval()


def tiny_vae(seed: int = 0):
    """A tiny ``AutoencoderKL`` with one 2x downsampling (16x16 images <-> 8x8x4 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def ddim_scheduler():
    """DDIM as Stable Diffusion 1.5 configures it (scaled-linear betas, steps_offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd_pipeline(hidden_size: int = 32, seed: int = 0):
    """A real ``StableDiffusionPipeline`` of tiny random models with the real CLIP tokenizer (16x16 images)."""
    from diffusers import StableDiffusionPipeline

    from .tokenizer import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_model(hidden_size=hidden_size, seed=seed),
        tokenizer=load_clip_tokenizer(),
        unet=tiny_unet(cross_attention_dim=hidden_size, seed=seed),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A real ``StableDiffusionXLPipeline`` of tiny random models: encoders of width 32 and 48."""
    from diffusers import StableDiffusionXLPipeline

    from .tokenizer import load_clip_tokenizer

    width_1, width_2 = 32, 48
    unet = tiny_unet(
        cross_attention_dim=width_1 + width_2,
        seed=seed,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=width_2 + 6 * 8,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_model(hidden_size=width_1, seed=seed),
        text_encoder_2=tiny_clip_text_model(
            hidden_size=width_2, seed=seed + 1, with_projection=True, projection_dim=width_2, pad_token_id=0
        ),
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=ddim_scheduler(),
    )


# ----------------------------------------------------------------------------------------------------------------
# SD3 / FLUX: a T5 encoder and its tokenizer, built offline, and the two pipelines
# ----------------------------------------------------------------------------------------------------------------

#: the words the tiny T5 tokenizer keeps whole (any other word falls back to its characters)
T5_TRAINING_TEXT = (
    "a an the of on in with at and by to from photo picture portrait painting drawing close up close-up person "
    "man woman child people smiling laughing looking standing sitting walking running red blue green yellow black "
    "white cube sphere table chair house street city garden beach mountain forest river sky sunset night morning "
    "light dark young old face hair eyes glasses beard hat shirt dress coat dog cat bird car tree flower window "
    "door book cup Ann Lee Zorblax Quentaro blurry sharp bright soft cinematic detailed studio outdoor indoor"
)
T5_VOCAB_SIZE = 256  # the tiny encoder's table; the tokenizer has fewer pieces than this


def tiny_t5_tokenizer():
    """A T5 tokenizer (``T5TokenizerFast``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then Unigram pieces), built offline.

    Like T5's: SentencePiece-style ``▁`` word starts, no BOS, EOS appended, padding after. Its Unigram vocabulary is
    written here rather than trained - ``tokenizers``' Unigram trainer is multi-threaded and gives different pieces
    from run to run - : every word of :data:`T5_TRAINING_TEXT` whole (``▁word``), and every character of them, so any
    other word of those letters splits into characters (other characters are ``<unk>``).
    """
    from transformers import T5TokenizerFast

    words = sorted(set(T5_TRAINING_TEXT.split()))
    chars = sorted({c for word in words for c in word})
    # Unigram keeps the split with the highest summed score: a whole word (-4) beats any two pieces (<= -8).
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    pieces += [("\u2581" + word, -4.0) for word in words] + [(c, -5.0) for c in chars]
    if len(pieces) > T5_VOCAB_SIZE:
        raise ValueError(f"the tiny T5 tokenizer has {len(pieces)} pieces; the tiny encoder has {T5_VOCAB_SIZE}")
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(d_model: int = 32, seed: int = 0, layers: int = 2, heads: int = 4):
    """A seeded tiny ``T5EncoderModel`` in eval mode, shaped like T5 v1.1 (gated-GELU feed-forward, relative
    position buckets 32 / distance 128, as SD3's and FLUX's T5-XXL) but ``d_model`` wide."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_model * 2,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def _flow_vae(latent_channels: int, seed: int):
    """A one-block ``AutoencoderKL`` as SD3 / FLUX configure theirs (no quant convs, a shift factor)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, clip_width: int = 32, t5_width: int = 64):
    """A real ``StableDiffusion3Pipeline`` of tiny random models: two CLIP encoders with projection (the real
    CLIP tokenizer), a T5 encoder (:func:`tiny_t5_tokenizer`), ``SD3Transformer2DModel``, ``AutoencoderKL``,
    ``FlowMatchEulerDiscreteScheduler``. 16x16 images; the T5 window is the pipeline's ``max_sequence_length``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from .tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,  # SD3 pads the CLIP states to T5's width and joins the two
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_width,  # the two CLIP encoders' projected pooled outputs, side by side
    ).eval()
    clip = dict(hidden_size=clip_width, with_projection=True, projection_dim=clip_width)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=4, seed=seed),
        text_encoder=tiny_clip_text_model(seed=seed, **clip),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_model(seed=seed + 1, pad_token_id=0, **clip),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        text_encoder_3=tiny_t5_encoder(d_model=t5_width, seed=seed + 2),
        tokenizer_3=tiny_t5_tokenizer(),
    )


def tiny_flux_pipeline(seed: int = 0, clip_width: int = 32, t5_width: int = 48):
    """A real ``FluxPipeline`` of tiny random models: a CLIP encoder (pooled output only; the real CLIP
    tokenizer), a T5 encoder (:func:`tiny_t5_tokenizer`), ``FluxTransformer2DModel``, ``AutoencoderKL``,
    ``FlowMatchEulerDiscreteScheduler``. 16x16 images (latents packed 2x2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from .tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 1 latent channel x the 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=1, seed=seed),
        text_encoder=tiny_clip_text_model(hidden_size=clip_width, seed=seed),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(d_model=t5_width, seed=seed + 2),
        tokenizer_2=tiny_t5_tokenizer(),
    )
