"""Reading image files as upright 8-bit RGB, the same way for training, evaluation and prediction."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from dynamixer.errors import DataError

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255, which turns such images almost all white
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
        img = Image.fromarray(values.astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully as an upright 8-bit RGB image.

    The EXIF orientation is applied, 16-bit greyscale is scaled to 8 bit, and
    transparent images are composited over a white background (the common
    convention). A file that cannot be decoded, or that Pillow refuses as a
    decompression bomb, raises ``DataError`` naming it and the fix.
    """
    try:
        with Image.open(path) as img:
            return _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise DataError(
            f"image {path} is too large to decode safely: {err} Pillow refuses images over twice "
            f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels. Resize the image or delete it"
        ) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or delete the file") from err
