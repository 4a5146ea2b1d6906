"""The model card (``README.md``) of a saved APL adapter, in the Hugging Face Hub's format.

PEFT writes a template full of "[More Information Needed]"; an APL adapter gets a card that says what the prefix
is and is not, how to apply it, the base model by its id (a local folder is named, never given as an absolute
path), and, when known, the training recipe and the bench table.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CARD_NAME = "README.md"

_TEMPLATE = """---
{card_data}
---

# APL prefix: {title}

An **Anonymization Prompt Learning** prefix (Shi, Zhang and Shan, IJCV 2026) for the {encoder} of
{base_line}: {m} learned vectors {placement} ({depth}). Prompts that name a real person give an anonymous
face; prompts without a person come out as before. The prefix goes on the positive prompt only.

It is not a face filter on the output, and it does not remove what the base model knows: a pipeline without the
prefix still draws the person.

## Use

{use}

## Prefix

| field | value |
|---|---|
| vectors (m) | {m} |
| width | {width} |
| depth | {depth} |
| initialisation | {init} |
| negative prompt prefixed | {negative} |
{recipe}{bench}"""


_USE_CLIP = """```python
from diffusers import StableDiffusionPipeline
from apl_adapter.pipelines import load_apl

pipe = StableDiffusionPipeline.from_pretrained("{base_id}")
load_apl(pipe, "path/or/hub-id/of/this/adapter")
image = pipe("a photo of <Name>", num_inference_steps=20, guidance_scale=7).images[0]
```

Export with the prefix baked into the text encoder: `apl-export <sd folder> --adapter <this folder> --out out/`."""

_USE_T5 = """```python
from diffusers import StableDiffusion3Pipeline
from apl_adapter.pipelines import load_apl

pipe = StableDiffusion3Pipeline.from_pretrained("{base_id}")
load_apl(pipe, adapter_3="path/or/hub-id/of/this/adapter")  # FluxPipeline: adapter_2=... (its T5)
image = pipe("a photo of <Name>", num_inference_steps=28).images[0]
```

Export with the prefix baked into the T5 graph: copy this folder to `<adapters>/text_encoder_3/` (SD3) or
`<adapters>/text_encoder_2/` (FLUX), then `apl-export <sd3 or flux folder> --adapter <adapters> --out out/`
(apl-adapter's docs/sd3_flux.md)."""


def public_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """A Hub id as is; a local folder by its name only (an absolute path says nothing to a reader, and leaks)."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    looks_local = os.path.isabs(text) or text.startswith((".", "~")) or Path(text).exists() or text.count("/") > 1
    return Path(text).name if looks_local else text


def pipeline_of(text_encoder_name_or_path: str | None) -> str | None:
    """``.../sd15/text_encoder`` (what ``from_pretrained`` of a pipeline folder records) -> ``.../sd15``."""
    if not text_encoder_name_or_path:
        return None
    path = Path(str(text_encoder_name_or_path))
    return str(path.parent) if path.name in ("text_encoder", "text_encoder_2", "text_encoder_3") else str(path)


def render_model_card(
    config, recipe: dict | None = None, bench_markdown: str | None = None, base_model: str | None = None
) -> ModelCard:
    """The card of an adapter with this :class:`~apl_adapter.APLConfig`; ``recipe`` = the training settings."""
    base_id = public_model_id(base_model or getattr(config, "base_model_name_or_path", None))
    data = ModelCardData(
        library_name="peft",
        base_model=base_id if base_id and "/" in base_id else None,
        tags=["apl", "anonymization", "privacy", "prompt-learning", "text-to-image", "peft"],
    )
    recipe_lines = ""
    if recipe:
        rows = "\n".join(f"| {k} | {v} |" for k, v in recipe.items())
        recipe_lines = f"\n## Training recipe\n\n| setting | value |\n|---|---|\n{rows}\n"
    bench = f"\n## Measured\n\n{bench_markdown.strip()}\n" if bench_markdown else ""
    t5 = getattr(config, "text_encoder_type", None) == "t5"
    use = _USE_T5 if t5 else _USE_CLIP
    text = _TEMPLATE.format(
        card_data=data.to_yaml(),
        encoder="T5 text encoder (SD3's `text_encoder_3`, FLUX's `text_encoder_2`)" if t5 else "CLIP text encoder",
        placement="in front of the prompt (positions 0..m-1)" if t5 else "inserted after BOS",
        use=use.format(base_id=base_id or ("path/to/stable-diffusion-3" if t5 else "path/to/stable-diffusion")),
        title=base_id or ("T5 text encoder" if t5 else "CLIP text encoder"),
        base_line=f"`{base_id}`" if base_id else "a Stable Diffusion model",
        m=config.num_virtual_tokens,
        width=config.token_dim,
        depth=("deep: keys and values at every encoder layer too" if config.prefix_depth == "deep" else "shallow")
        + ("; its own output rows hidden from the denoiser" if getattr(config, "hide_prefix_rows", False) else ""),
        init=config.prefix_init,
        negative=config.apply_to_negative_prompt,
        recipe=recipe_lines,
        bench=bench,
    )
    return ModelCard(text)


def write_model_card(
    folder: str | os.PathLike, config, recipe: dict | None = None, bench_markdown=None, base_model=None
) -> Path:
    """Write ``folder/README.md`` (replacing PEFT's template)."""
    path = Path(folder) / CARD_NAME
    render_model_card(config, recipe, bench_markdown, base_model).save(path)
    return path
