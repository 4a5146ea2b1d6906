"""The synthetic-identity world: procedural people and scenes, a tiny Stable Diffusion trained on
them, its sibling and DreamBooth fine-tunes, and the recognizers that measure APL on it.

```python
>>> from apl_adapter.world import WorldSpec, load_world_pipeline, WorldIdentityRecognizer
>>> world = WorldSpec.from_seed(0)
>>> [p.name for p in world.seen][:2]
['Ralthythmyx Thilfend', 'Vildrextex Nomtymlam']

```
"""

from .models import ASSETS, MODEL_KINDS, assemble_pipeline, load_world_pipeline, model_path
from .recognizers import WorldAttributeRecognizer, WorldIdentityRecognizer, WorldSceneRecognizer
from .render import IMAGE_SIZE, render_face, render_scene
from .spec import Identity, Scene, WorldSpec, describe

__all__ = [
    "ASSETS",
    "IMAGE_SIZE",
    "MODEL_KINDS",
    "Identity",
    "Scene",
    "WorldAttributeRecognizer",
    "WorldIdentityRecognizer",
    "WorldSceneRecognizer",
    "WorldSpec",
    "assemble_pipeline",
    "describe",
    "load_world_pipeline",
    "model_path",
    "render_face",
    "render_scene",
]
