"""Reading image files as upright 8-bit RGB, the same way for training, evaluation and prediction.

How each Pillow mode becomes 8-bit RGB (``load_rgb``); only the first frame of a multi-frame file is read:

* ``RGB``, ``L``, ``1``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``: Pillow's own conversion (CMYK as
  ``(255 - C) * (255 - K) / 255``, YCbCr as JPEG's BT.601); ``LAB`` (D50) to sRGB through LittleCMS, relative
  colorimetric. Embedded ICC profiles are not applied, as in timm and torchvision.
* Integer greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``) is scaled by the largest value of its
  bit depth, ``round(v * 255 / (2**bits - 1))``. The depth is the PNG ``sBIT`` chunk's when the file has one
  and its values fit in it (values above it are the PNG standard's left-aligned samples: 16 bits), else the
  smallest of 8, 10, 12, 14 and 16 bits that holds the image's largest value: 12-bit data stored in a
  16-bit file (0..4095) is divided by 4095, ``I`` holding 0..255 is kept as is. Values outside 0..65535
  (mode ``I``) are refused. A 16-bit transparent key (PNG ``tRNS``) turns white.
* Float greyscale (``F``): values in 0..1 are multiplied by 255 (the torchvision convention), values in
  0..255 are kept, any other range is stretched min-max to 0..255; NaN or infinite values are refused.
* Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P`` with a transparent palette, a colour key
  on ``L``, ``RGB`` or ``1``) is composited over white.
* 16-bit-per-sample colour files (RGB, RGBA, LA PNG or TIFF), which Pillow reads keeping each sample's top
  8 bits, are refused when all their colour samples are below 4096 (12-bit data would decode black).

Memory: the high-bit modes are converted in row blocks of about a million pixels, so the peak is the decoded
image plus its 8-bit copy and then the 8-bit copy plus the RGB result (Pillow stores RGB in 4 bytes a pixel).
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
from PIL import Image, ImageCms

from dynamixer.errors import DataError

_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_BIT_DEPTHS = (8, 10, 12, 14, 16)
_PILLOW_CONVERTS = ("RGB", "RGBX", "CMYK", "YCbCr", "HSV")
_BLOCK_PIXELS = 1 << 20
_INVERT = list(range(255, -1, -1))
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the raster formats image data sets hold; Pillow would otherwise pick any of its decoders by the content,
# whatever the name (a "photo.png" of PostScript runs Ghostscript): anything else is an unreadable image
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM", "GIF")
# EXIF orientation -> the transposition that shows the image upright (as PIL.ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class _Unconvertible(ValueError):
    """A decoded image that has no faithful 8-bit RGB form; the message names the mode and the fix."""


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    # unoptimised: LittleCMS's default 8-bit lookup table is off by up to 10 levels near the gamut's edges
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    intent, flags = ImageCms.Intent.RELATIVE_COLORIMETRIC, ImageCms.Flags.NOOPTIMIZE
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB", renderingIntent=intent, flags=flags)


def _rawmode(img: Image.Image) -> str:
    """The raw mode the file's first tile is decoded from (``"RGB;16B"`` for 16-bit RGB PNG), or ``""``."""
    tile = getattr(img, "tile", None)
    if not tile:
        return ""
    args = tile[0][3]
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _png_sbit(source: str | bytes) -> int | None:
    """The significant bits of a greyscale PNG's samples (its ``sBIT`` chunk), or None without one;
    ``source`` is the file's path or its bytes."""
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
        if f.read(8) != _PNG_MAGIC:
            return None
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                data = f.read(min(length, 4))  # one byte a channel
                return data[0] if data and 1 <= data[0] <= 16 else None
            if kind in (b"IDAT", b"IEND"):
                return None
            f.seek(length + 4, 1)
    return None


def _blocks(img: Image.Image):
    """``(first row, rows as a numpy array)`` for row blocks of about ``_BLOCK_PIXELS`` pixels."""
    w, h = img.size
    step = max(1, _BLOCK_PIXELS // max(w, 1))
    for y in range(0, h, step):
        yield y, np.asarray(img.crop((0, y, w, min(h, y + step))))


def _scaled(img: Image.Image, scale: float, offset: float = 0.0, key: int | None = None) -> Image.Image:
    """Mode ``L`` from a one-band image: ``round(v * scale + offset)`` clipped to 0..255, ``key`` white."""
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)
    for y, block in _blocks(img):
        v = block.astype(np.float32)
        v *= np.float32(scale)
        v += np.float32(offset + 0.5)
        np.clip(v, 0, 255, out=v)
        rows = out[y : y + len(block)]
        rows[...] = v  # truncation of v + 0.5 >= 0: rounding
        if key is not None:
            rows[block == key] = 255
    return Image.fromarray(out)


def _extrema(img: Image.Image) -> tuple[float, float]:
    lo, hi = np.inf, -np.inf
    for _, block in _blocks(img):
        lo, hi = min(lo, block.min()), max(hi, block.max())  # NaN propagates
    return float(lo), float(hi)


def _integer_to_l(img: Image.Image, source: str | bytes) -> Image.Image:
    lo, hi = _extrema(img)
    if lo < 0 or hi > 65535:
        raise _Unconvertible(
            f"mode {img.mode} holds values from {lo:g} to {hi:g}, outside the 0..65535 of 16-bit images. "
            "Rescale it to 8 bits (0..255) or 16 bits (0..65535), or delete the file"
        )
    sbit = _png_sbit(source) if img.format == "PNG" else None
    if sbit is not None:
        bits = sbit if hi < 2**sbit else 16
    else:
        bits = next(b for b in _BIT_DEPTHS if hi < 2**b)
    key = img.info.get("transparency")
    return _scaled(img, 255 / (2**bits - 1), key=key if isinstance(key, int) else None)


def _float_to_l(img: Image.Image) -> Image.Image:
    lo, hi = _extrema(img)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise _Unconvertible(
            f"mode {img.mode} (32-bit float) holds NaN or infinite values. Replace them with finite values "
            "(or save the image as 8-bit), or delete the file"
        )
    if lo >= 0 and hi <= 1:
        return _scaled(img, 255.0)
    if lo >= 0 and hi <= 255:
        return _scaled(img, 1.0)
    scale = 255 / (hi - lo) if hi > lo else 0.0
    return _scaled(img, scale, -lo * scale)


def _palette_over_white(img: Image.Image) -> Image.Image:
    img.apply_transparency()  # a transparent index or alpha bytes in info -> an RGBA palette
    pal = np.asarray(img.getpalette("RGBA"), dtype=np.int32).reshape(-1, 4)
    a = pal[:, 3:]
    rgb = (pal[:, :3] * a + 255 * (255 - a) + 127) // 255
    img.putpalette(rgb.astype(np.uint8).tobytes(), "RGB")
    return img.convert("RGB")


def _check_wide_samples(img: Image.Image) -> None:
    """Refuse 16-bit colour samples that Pillow cut to their top 8 bits when those are all below 16."""
    extrema = img.getextrema()
    if not isinstance(extrema[0], tuple):
        extrema = (extrema,)
    top = max(hi for band, (_, hi) in zip(img.getbands(), extrema) if band != "A")
    if top < 16:
        raise _Unconvertible(
            f"mode {img.mode} from 16-bit samples that are all below 4096 (12-bit data?), of which Pillow "
            "keeps only the top 8 bits, so it would decode almost black. Save it as 8-bit (scaled to 0..255) "
            "or as 16-bit greyscale, or delete the file"
        )


def _to_8bit(img: Image.Image, source: str | bytes, rawmode: str) -> Image.Image:
    """``img`` (the first frame of ``source``, a path or the file's bytes, decoded from ``rawmode``) as a new
    ``L`` or ``RGB`` image, not yet turned upright."""
    mode = img.mode
    if mode in _INTEGER_MODES:
        return _integer_to_l(img, source)
    if mode == "F":
        return _float_to_l(img)
    if ";16" in rawmode:
        img.load()
        _check_wide_samples(img)
    if mode == "P":
        if "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA"):
            return _palette_over_white(img)
        return img.convert("RGB")
    key = img.info.get("transparency")
    if mode == "L" and isinstance(key, int) and 0 <= key <= 255:
        return img.point([255 if v == key else v for v in range(256)])
    if mode in ("La", "RGBa", "PA") or (key is not None and mode in ("1", "L", "RGB", "RGBX")):
        img = img.convert("LA" if mode == "La" else "RGBA")
    if img.mode in ("LA", "RGBA"):
        # over white, in place: round(c * a + 255 * (1 - a)); the decoded image is freed before the compositing
        inverse, base = img.getchannel("A").point(_INVERT), img.convert(img.mode[:-1])
        img.close()
        base.paste(255 if base.mode == "L" else (255, 255, 255), mask=inverse)
        return base
    if mode in ("1", "L"):
        return img.convert("L")
    if mode == "LAB":
        return ImageCms.applyTransform(img, _lab_to_srgb())
    if mode in _PILLOW_CONVERTS:
        return img.convert("RGB")
    raise _Unconvertible(f"mode {mode} has no conversion to RGB. Save it as 8-bit RGB, or delete the file")


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Decode an image file fully as an upright 8-bit RGB image: the file at ``path``, or, given ``data``, the
    encoded bytes of an image stored elsewhere (a shard) that ``path`` names in messages.

    Only the raster formats in ``FORMATS`` are decoded. The EXIF orientation is applied, every Pillow mode is
    converted as the module docstring lists (16-bit, 12-bit-in-16-bit and 32-bit greyscale scaled by their
    depth, float by its range), and transparent images are composited over a white background (the common
    convention). A file that cannot be decoded, or converted faithfully, or that Pillow refuses as a
    decompression bomb, raises ``DataError`` naming it and the fix.
    """
    try:
        with Image.open(path if data is None else io.BytesIO(data), formats=FORMATS) as src:
            rawmode = _rawmode(src)  # before getexif(), which may load the image and drop its tiles
            upright = _UPRIGHT.get(src.getexif().get(0x0112))
            if src.mode in ("RGB", "L") and "transparency" not in src.info and ";16" not in rawmode:
                img = src.convert("RGB")  # the common case: one conversion (or copy), nothing else
            else:
                img = _to_8bit(src, path if data is None else data, rawmode)
            src.close()  # frees the decoded image now (leaving the block does not), before the RGB is made
        if upright is not None:
            img = img.transpose(upright)
            for key in ("exif", "xmp", "XML:com.adobe.xmp"):  # their orientation is applied: not to be again
                img.info.pop(key, None)
        return img if img.mode == "RGB" else img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise DataError(
            f"image {path} is too large to decode safely: {err} Pillow refuses images over twice "
            f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels. Resize the image or delete it"
        ) from err
    except _Unconvertible as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or delete the file") from err
