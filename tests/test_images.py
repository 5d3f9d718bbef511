"""Tests of `load_rgb` for every Pillow mode a file can come in: values, refusals and bounded memory.

The cases of tests/test_data.py (EXIF orientation of JPEGs, full-range 16-bit greyscale, fully transparent
pixels, an undecodable file, decompression bombs) are not repeated here.
"""

from __future__ import annotations

import colorsys
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from dynamixer.data import DataError, load_rgb


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo (scikit-learn's china.jpg), 54x80 RGB."""
    return np.ascontiguousarray(load_sample_images().images[0][::8, ::8])


def _grey(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).convert("L"))


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _round(x) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).clip(0, 255).astype(np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return _round(colour * a + 255 * (1 - a))


def _ramp(shape: tuple[int, ...]) -> np.ndarray:
    """Alpha rising from 0 to 255 across the columns."""
    return np.broadcast_to(np.linspace(0, 255, shape[1]).round().astype(np.uint8), shape[:2]).copy()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png16(path: Path, values: np.ndarray, sbit: int | None = None) -> Path:
    """A 16-bit greyscale (HxW) or RGB (HxWx3) PNG, with an ``sBIT`` chunk if given (Pillow writes neither)."""
    h, w = values.shape[:2]
    colour = values.ndim == 3
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    head = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2 if colour else 0, 0, 0, 0))
    sbit_chunk = _chunk(b"sBIT", bytes([sbit] * (3 if colour else 1))) if sbit else b""
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + head + sbit_chunk + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    )
    return path


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# --- every mode: (file, expected 8-bit RGB, tolerance in levels, mode Pillow opens it as) ------------------


def _one(tmp, photo):
    grey = _grey(photo)
    return _save(Image.fromarray(grey > 128), tmp / "bw.png"), _rgb(np.where(grey > 128, 255, 0)), 0, "1"


def _l(tmp, photo):
    return _save(Image.fromarray(_grey(photo)), tmp / "l.png"), _rgb(_grey(photo)), 0, "L"


def _rgb_png(tmp, photo):
    return _save(Image.fromarray(photo), tmp / "rgb.png"), photo, 0, "RGB"


def _rgb_16_png(tmp, photo):
    """16-bit RGB PNG, full range: Pillow keeps the top byte of each sample."""
    return _write_png16(tmp / "rgb16.png", photo.astype(np.uint16) * 257), photo, 0, "RGB"


def _rgba(tmp, photo):
    alpha = _ramp(photo.shape)
    path = _save(Image.fromarray(np.dstack([photo, alpha])), tmp / "rgba.png")
    return path, _over_white(photo, alpha), 1, "RGBA"


def _la(tmp, photo):
    grey, alpha = _grey(photo), _ramp(photo.shape)
    path = _save(Image.fromarray(np.dstack([grey, alpha]), "LA"), tmp / "la.png")
    return path, _rgb(_over_white(grey[..., None], alpha)[..., 0]), 1, "LA"


def _quantized(photo) -> tuple[Image.Image, np.ndarray]:
    p = Image.fromarray(photo).quantize(64)
    return p, np.asarray(p.convert("RGB"))


def _pa(tmp, photo):
    p, colour = _quantized(photo)
    alpha = _ramp(photo.shape)
    pa = p.convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    return _save(pa, tmp / "pa.tif"), _over_white(colour, alpha), 1, "PA"


def _p_alpha_bytes(tmp, photo):
    """A palette with partial alpha per entry (PNG tRNS bytes)."""
    p, colour = _quantized(photo)
    alphas = bytes((i * 37) % 256 for i in range(64))
    alpha = np.frombuffer(alphas, np.uint8)[np.asarray(p)]
    return _save(p, tmp / "p.png", transparency=alphas), _over_white(colour, alpha), 1, "P"


def _gif_frames(tmp, photo):
    """Multi-frame GIF: the first frame (red left half, transparent right half) is the image."""
    first = Image.new("P", (8, 4), 1)
    first.putpalette([255, 0, 0, 0, 0, 0, 0, 255, 0])
    first.paste(0, (0, 0, 4, 4))
    second = Image.new("P", (8, 4), 2)
    second.putpalette([255, 0, 0, 0, 0, 0, 0, 255, 0])
    path = _save(first, tmp / "anim.gif", save_all=True, append_images=[second], transparency=1, disposal=2)
    assert Image.open(path).n_frames == 2
    expected = np.full((4, 8, 3), 255, np.uint8)
    expected[:, :4] = (255, 0, 0)
    return path, expected, 0, "P"


def _tiff_pages(tmp, photo):
    path = _save(Image.fromarray(photo), tmp / "pages.tif", save_all=True, append_images=[Image.fromarray(~photo)])
    assert Image.open(path).n_frames == 2
    return path, photo, 0, "RGB"


def _l_key(tmp, photo):
    grey = _grey(photo)
    key = int(np.bincount(grey.ravel()).argmax())
    path = _save(Image.fromarray(grey), tmp / "lkey.png", transparency=key)
    return path, _rgb(np.where(grey == key, 255, grey)), 0, "L"


def _rgb_key(tmp, photo):
    key = tuple(int(v) for v in photo[0, 0])
    path = _save(Image.fromarray(photo), tmp / "rgbkey.png", transparency=key)
    expected = np.where((photo == key).all(axis=2, keepdims=True), 255, photo)
    return path, expected, 0, "RGB"


def _twelve(photo) -> np.ndarray:
    """The photo's grey levels as 12-bit values, 0..4095."""
    return np.floor(_grey(photo) * (4095 / 255) + 0.5).astype(np.uint16)


def _i16_12bit(tmp, photo):
    """12-bit data (0..4095) in a 16-bit PNG without sBIT: scaled by 4095, the photo again."""
    return _write_png16(tmp / "twelve.png", _twelve(photo)), _rgb(_grey(photo)), 0, "I;16"


def _i16_sbit_raw(tmp, photo):
    """sBIT 12 and values below 1024: scaled by 4095 (by the data alone it would be 10-bit, /1023)."""
    values = np.floor(_grey(photo) * (1000 / 255) + 0.5).astype(np.uint16)
    path = _write_png16(tmp / "sbit12.png", values, sbit=12)
    return path, _rgb(_round(values * (255 / 4095))), 0, "I;16"


def _i16_sbit_scaled(tmp, photo):
    """sBIT 12 and samples left-aligned to 16 bits as the PNG standard has them: scaled by 65535."""
    values = _twelve(photo) << 4
    path = _write_png16(tmp / "sbit12l.png", values, sbit=12)
    return path, _rgb(_round(values * (255 / 65535))), 0, "I;16"


def _i16b_12bit_tiff(tmp, photo):
    values = _twelve(photo)
    img = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    return _save(img, tmp / "twelve.tif"), _rgb(_grey(photo)), 0, "I;16B"


def _i16_14bit_tiff(tmp, photo):
    values = np.floor(_grey(photo) * (16383 / 255) + 0.5).astype(np.uint16)
    img = Image.frombytes("I;16L", values.shape[::-1], values.astype("<u2").tobytes())
    return _save(img, tmp / "fourteen.tif"), _rgb(_grey(photo)), 0, "I;16"


def _i_8bit(tmp, photo):
    """Mode I (32-bit integer TIFF) holding 0..255: kept as is, neither black nor clipped."""
    return _save(Image.fromarray(_grey(photo).astype(np.int32)), tmp / "i8.tif"), _rgb(_grey(photo)), 0, "I"


def _f_unit(tmp, photo):
    img = Image.fromarray(_grey(photo).astype(np.float32) / 255)
    return _save(img, tmp / "f1.tif"), _rgb(_grey(photo)), 0, "F"


def _f_255(tmp, photo):
    return _save(Image.fromarray(_grey(photo).astype(np.float32)), tmp / "f255.tif"), _rgb(_grey(photo)), 0, "F"


def _f_arbitrary(tmp, photo):
    values = _grey(photo).astype(np.float32) * 3.5 - 200
    lo, hi = float(values.min()), float(values.max())
    path = _save(Image.fromarray(values), tmp / "f.tif")
    return path, _rgb(_round((values - lo) * (255 / (hi - lo)))), 1, "F"


def _cmyk_values(photo) -> np.ndarray:
    k = _ramp(photo.shape) // 2
    return np.dstack([255 - photo, k]).astype(np.uint8)


def _cmyk_expected(cmyk: np.ndarray) -> np.ndarray:
    c = cmyk.astype(np.float64)
    return _round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)


def _cmyk_tiff(tmp, photo):
    cmyk = _cmyk_values(photo)
    return _save(Image.fromarray(cmyk, "CMYK"), tmp / "cmyk.tif"), _cmyk_expected(cmyk), 1, "CMYK"


def _cmyk_jpeg(tmp, photo):
    path = _save(Image.fromarray(_cmyk_values(photo), "CMYK"), tmp / "cmyk.jpg", quality=95)
    return path, _cmyk_expected(np.asarray(Image.open(path))), 1, "CMYK"  # as decoded (JPEG is lossy)


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """Pillow's 8-bit CIELAB (D50; a and b as signed bytes) -> sRGB, through XYZ and Bradford adaptation."""
    signed = lab.view(np.int8).astype(np.float64)
    lum, a, b = lab[..., 0] * (100 / 255), signed[..., 1], signed[..., 2]
    fy = (lum + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * (0.9642, 1.0, 0.8249)
    bradford = np.array(
        [[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077], [0.0122982, -0.0204830, 1.3299098]]
    )
    to_srgb = np.array(
        [[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]]
    )
    lin = np.clip(xyz @ (to_srgb @ bradford).T, 0, 1)
    return _round(255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055))


def _lab_tiff(tmp, photo):
    img = Image.fromarray(photo).convert("LAB")
    return _save(img, tmp / "lab.tif"), _lab_to_srgb(np.asarray(img)), 1, "LAB"


CASES: dict[str, Callable] = {
    "1": _one,
    "L": _l,
    "RGB": _rgb_png,
    "RGB 16-bit PNG": _rgb_16_png,
    "RGBA": _rgba,
    "LA": _la,
    "PA": _pa,
    "P alpha bytes": _p_alpha_bytes,
    "GIF first frame": _gif_frames,
    "TIFF first page": _tiff_pages,
    "L colour key": _l_key,
    "RGB colour key": _rgb_key,
    "I;16 12-bit": _i16_12bit,
    "I;16 sBIT raw": _i16_sbit_raw,
    "I;16 sBIT left-aligned": _i16_sbit_scaled,
    "I;16B 12-bit": _i16b_12bit_tiff,
    "I;16 14-bit": _i16_14bit_tiff,
    "I 0..255": _i_8bit,
    "F 0..1": _f_unit,
    "F 0..255": _f_255,
    "F arbitrary": _f_arbitrary,
    "CMYK TIFF": _cmyk_tiff,
    "CMYK JPEG": _cmyk_jpeg,
    "LAB": _lab_tiff,
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_decodes_to_the_expected_8_bit_rgb(tmp_path, photo, case):
    path, expected, tol, mode = CASES[case](tmp_path, photo)
    assert Image.open(path).mode == mode
    img = load_rgb(str(path))
    out = np.asarray(img).astype(np.int16)
    assert img.mode == "RGB" and out.shape == expected.shape
    worst = int(np.abs(out - expected).max())
    assert worst <= tol, f"{case}: off by up to {worst} levels"


@pytest.mark.parametrize("case", ["I;16 12-bit", "I;16B 12-bit", "I;16 14-bit", "I 0..255"])
def test_deep_integer_images_holding_few_bits_are_not_black(tmp_path, photo, case):
    path, *_ = CASES[case](tmp_path, photo)
    out = np.asarray(load_rgb(str(path)))
    assert out.mean() > 0.8 * _grey(photo).mean() and out.max() > 200


@pytest.mark.parametrize(
    "mode, pixels, expected",
    [
        ("HSV", [(0, 255, 255), (85, 255, 128), (170, 128, 255), (30, 0, 77)], None),
        ("RGBa", [(0, 0, 0, 0), (100, 50, 0, 128), (255, 0, 0, 255), (10, 20, 30, 40)], None),
        ("La", [(0, 0), (64, 128), (255, 255), (20, 40)], None),
        ("I;16N", [0, 4095, 2048, 1000], [0, 255, 128, 62]),
    ],
)
def test_modes_no_file_format_opens_as(monkeypatch, tmp_path, mode, pixels, expected):
    """HSV, premultiplied RGBa and La, and native-order I;16N exist only in memory (a plugin could make them)."""
    img = Image.new(mode, (4, 1))
    for x, value in enumerate(pixels):
        img.putpixel((x, 0), value)
    monkeypatch.setattr(Image, "open", lambda path, *a, **kw: img)
    out = np.asarray(load_rgb(str(tmp_path / "x"))).astype(int)[0]
    px = np.array(pixels, dtype=np.float64)
    if mode == "HSV":
        want = [[255 * c for c in colorsys.hsv_to_rgb(*(p / 255))] for p in px]
    elif mode in ("RGBa", "La"):  # premultiplied: over white is colour + (255 - alpha)
        colour = px[:, :-1] if mode == "RGBa" else np.repeat(px[:, :1], 3, axis=1)
        want = colour + (255 - px[:, -1:])
    else:
        want = np.repeat(np.array(expected)[:, None], 3, axis=1)  # 12-bit: scaled by 4095
    assert np.abs(out - _round(want)).max() <= 1, (out, want)


def test_exif_orientation_of_a_16_bit_png(tmp_path):
    """The upright turn is applied on the converted 8-bit image of the slow path too."""
    values = np.zeros((20, 40), np.uint16)
    values[:10, :10] = 4095  # bright top-left corner as stored, 12-bit data
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the corner lands top-right
    path = tmp_path / "rot.png"
    Image.fromarray(values).save(path, exif=exif)
    img = load_rgb(str(path))
    assert img.size == (20, 40) and img.getpixel((15, 5)) == (255, 255, 255) and img.getpixel((5, 5)) == (0, 0, 0)


# --- refusals ----------------------------------------------------------------------------------------------


def _nan(tmp: Path) -> Path:
    values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    values[1, 2] = np.nan
    return _save(Image.fromarray(values), tmp / "nan.tif")


def _inf(tmp: Path) -> Path:
    values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    values[2, 0] = np.inf
    return _save(Image.fromarray(values), tmp / "inf.tif")


def _negative_i(tmp: Path) -> Path:
    return _save(Image.fromarray(np.array([[-5, 0, 300]], np.int32)), tmp / "neg.tif")


def _rgb_16_12bit(tmp: Path) -> Path:
    values = np.zeros((4, 4, 3), np.uint16)
    values[:2] = 4095  # 12-bit white, of which Pillow would keep 15
    return _write_png16(tmp / "rgb12.png", values)


@pytest.mark.parametrize(
    "write, words",
    [
        (_nan, ("mode F", "NaN")),
        (_inf, ("mode F", "infinite")),
        (_negative_i, ("mode I", "-5", "0..65535")),
        (_rgb_16_12bit, ("mode RGB", "16-bit", "4096")),
    ],
)
def test_images_without_a_faithful_8_bit_form_raise_naming_file_mode_and_fix(tmp_path, write, words):
    path = write(tmp_path)
    with pytest.raises(DataError) as err:
        load_rgb(str(path))
    msg = str(err.value)
    assert msg.startswith(f"cannot read image {path}: ") and msg.endswith("or delete the file"), msg
    assert all(word in msg for word in words), msg
    assert err.value.__cause__ is not None and words[0] in str(err.value.__cause__)  # the reason, for listings


# --- memory ------------------------------------------------------------------------------------------------

_MEASURE = r"""
import resource, sys, tracemalloc
from dynamixer.data.images import load_rgb

load_rgb(sys.argv[2])  # a small 16-bit PNG first: imports and Pillow's plugins are in place before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
img = load_rgb(sys.argv[1])
numpy_peak = tracemalloc.get_traced_memory()[1]
rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(rise // 1024, numpy_peak // 2**20, img.mode, img.size[0], img.size[1], img.getextrema() == ((0, 0),) * 3)
"""


def test_a_large_16_bit_png_decodes_with_bounded_memory(tmp_path):
    """8000x8000 16-bit zeros (124 KB, 128 MB decoded, 256 MB as Pillow's RGB): the peak RSS rise of a fresh
    process stays within a small multiple of the decoded image (it was 1.2 GB with int64 copies)."""
    w = h = 8000
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * w)
    body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    big = tmp_path / "zeros16.png"
    big.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )
    small = _write_png16(tmp_path / "small16.png", np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big), str(small)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    rise_mb, numpy_mb, mode, width, height, black = run.stdout.split()
    print(f"8000x8000 16-bit PNG: peak RSS rise {rise_mb} MB, numpy peak (tracemalloc) {numpy_mb} MB")
    assert (mode, width, height, black) == ("RGB", "8000", "8000", "True")
    assert int(rise_mb) < 600 and int(numpy_mb) < 200


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
# formats Pillow writes and would read whatever a file's name says, that no image data set holds
# (not SPIDER: its writer registers the name's extension as its own, and later ".png" saves of the process write it)
OTHER_FORMATS = ("PCX", "SGI", "TGA", "IM", "ICO", "DDS", "QOI", "MSP", "XBM")


def files_of_other_formats(folder: Path, photo) -> list[Path]:
    """Files named `.png` and `.JPEG` that hold PostScript (what runs Ghostscript) or another of Pillow's formats."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "photo.png").write_bytes(POSTSCRIPT)
    (folder / "n01440764_1.JPEG").write_bytes(POSTSCRIPT)
    files = [folder / "photo.png", folder / "n01440764_1.JPEG"]
    small = Image.fromarray(photo[:32, :32])
    for kind in OTHER_FORMATS:
        image = small.convert("1") if kind in ("MSP", "XBM") else small
        image.save(folder / f"{kind.lower()}.png", format=kind)
        files.append(folder / f"{kind.lower()}.png")
    return files


@pytest.fixture
def recorded_decoders(tmp_path: Path, monkeypatch) -> Path:
    """Stand-ins for the programs Pillow's plugins run (Ghostscript), first on PATH: each records that it ran in
    the returned file, and fails."""
    import os

    folder, ran = tmp_path / "bin", tmp_path / "decoders_ran"
    folder.mkdir()
    for name in ("gs", "gswin32c", "gswin64c"):
        (folder / name).write_text(f"#!/bin/sh\necho {name} >> {ran}\nexit 1\n")
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return ran


def test_a_file_of_another_format_is_an_unreadable_image_and_runs_no_program(tmp_path, photo, recorded_decoders):
    for path in files_of_other_formats(tmp_path / "files", photo):
        with pytest.raises(DataError, match="cannot read image"):
            load_rgb(str(path))
        with pytest.raises(DataError, match="cannot read image"):
            load_rgb(path.name, data=path.read_bytes())  # as a shard's member
    assert not recorded_decoders.exists()


def test_predict_lists_files_of_other_formats_as_unreadable_and_prints_no_terminal_control(
    digits_run: Path, tmp_path: Path, photo, recorded_decoders, entry
) -> None:
    import json

    import torch

    inputs = tmp_path / "inputs"
    others = files_of_other_formats(inputs, photo)
    Image.fromarray(photo[:40, :40]).save(inputs / "good.png")
    checkpoint = torch.load(digits_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["data_info"]["class_names"] = [
        "\x1b[2J\x1b]0;owned\x07zero",
        *map(str, range(1, 10)),
    ]
    torch.save(checkpoint, tmp_path / "named.ckpt")
    code, out, err = entry(
        "predict.py", [f"ckpt_path={tmp_path / 'named.ckpt'}", f"inputs={inputs}", "top_k=10"], tmp_path
    )
    assert code == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err and "\\x1b[2J" in out
    (folder,) = (tmp_path / "logs" / "predict" / "runs").iterdir()
    written = json.loads((folder / "predictions.json").read_text())
    assert [Path(p["file"]).name for p in written["predictions"]] == ["good.png"]
    assert sorted(Path(u["file"]).name for u in written["unreadable"]) == sorted(p.name for p in others)
    assert not recorded_decoders.exists()
