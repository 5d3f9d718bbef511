"""DynaMixer (Wang et al., ICML 2022): the backbone, registered with timm, and its training framework."""

from .models import DynaMixer, load_release_checkpoint

__all__ = ["DynaMixer", "load_release_checkpoint"]
__version__ = "0.1.0"
