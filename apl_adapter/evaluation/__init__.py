"""``apl-eval``: identity leakage and image quality of an APL prefix on a real diffusers model.

Generates every prompt with and without the prefix (same seeds), measures the faces with an offline
recognizer against reference photos, optionally scores CLIP score and FID with weights supplied by
path, and writes a report folder (JSON, Markdown, HTML, an image grid). See :func:`evaluate`.
"""

from .runner import EvalSettings, evaluate
from .specs import EvalInputError, Identity, PromptSet, load_identities, load_prompts

__all__ = ["EvalInputError", "EvalSettings", "Identity", "PromptSet", "evaluate", "load_identities", "load_prompts"]
