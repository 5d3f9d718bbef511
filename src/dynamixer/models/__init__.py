"""DynaMixer backbone: building blocks, timm registration and the release-checkpoint key map.

Importing this package registers `dynamixer_tiny`, `dynamixer_s`, `dynamixer_m` and `dynamixer_l`
with timm, so `timm.create_model("dynamixer_s")` works.
"""

from .dynamixer import (
    DynaMixer,
    DynaMixerBlock,
    DynaMixerOp,
    DynaMixerTokenMixer,
    checkpoint_filter_fn,
    release_key_map,
    stage_resolutions,
)
from .release import load_release_checkpoint, model_kwargs_from_release
from .weights import create_model, load_pretrained_file, read_weights

__all__ = [
    "DynaMixer",
    "DynaMixerBlock",
    "DynaMixerOp",
    "DynaMixerTokenMixer",
    "checkpoint_filter_fn",
    "create_model",
    "load_pretrained_file",
    "read_weights",
    "load_release_checkpoint",
    "model_kwargs_from_release",
    "release_key_map",
    "stage_resolutions",
]
