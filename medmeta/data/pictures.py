"""PNG/JPEG read as they show, converted through their own mode (what they show, not what they store); the format entry.

Preflight (:func:`check_picture`, via :func:`read_picture`) and training (:class:`MedmetaPictureReader`)
read a picture to the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.data import PILReader
from PIL import Image, UnidentifiedImageError

from medmeta.data.format_spec import ImageFormat, ReadProblem

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_KEPT_MODES = ("L", "RGB", "I;16", "I", "F")


def convert_picture(image: Image.Image) -> Image.Image:
    """Convert a PNG/JPEG through its own mode to the pixels it shows (PIL's conversions throughout).

    ``L``, ``RGB``, ``I;16`` (16-bit grey, values kept, not clipped to 8 bit), ``I`` and ``F``
    are kept; other 16-bit layouts become native ``I;16``; ``1`` becomes ``L`` (0 or 255). A
    palette image (``P``) shows its palette colours: ``RGB``, or ``L`` when every colour it shows
    is grey. ``CMYK`` (PIL's JPEG decoder already undoes Adobe's inverted CMYK), ``YCbCr``,
    ``LAB``, ``HSV`` and ``RGBX`` become ``RGB``. An alpha channel (``RGBA``, ``LA``, ``PA``, a
    palette with a transparent entry) is composited on black: what the image shows on a black
    background, so a fully transparent pixel is 0; grey images with alpha stay ``L``.

    Args:
        image: an opened PIL image.

    Returns:
        A loaded image in mode ``L``, ``RGB``, ``I;16``, ``I`` or ``F``.
    """
    mode = image.mode
    if mode in _KEPT_MODES:
        return image
    if mode.startswith("I;16"):
        return Image.fromarray(np.asarray(image).astype(np.uint16))
    if mode == "1":
        return image.convert("L")
    grey = mode in ("LA", "La")
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image.convert("RGBA"))
    rgb = image.convert("RGB")
    if mode in ("P", "PA"):
        pixels = np.asarray(rgb)
        grey = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    return rgb.convert("L") if grey else rgb


def read_picture(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG fully, converted by :func:`convert_picture`, as ``[rows, cols]`` or ``[rows, cols, 3]``.

    Raises:
        PIL.UnidentifiedImageError: not an image PIL can identify.
        OSError: the file cannot be opened or decoded (e.g. cut short).
    """
    with Image.open(path) as image:
        image.load()
        return np.asarray(convert_picture(image))


class MedmetaPictureReader(PILReader):
    """MONAI's ``PILReader`` with every image converted by :func:`convert_picture`.

    Training (``load_transforms``) and preflight (:func:`read_picture`) thus read a PNG/JPEG to
    the same pixels. Axes follow ``PILReader``: ``[cols, rows]`` plus a trailing channel axis.
    """

    def __init__(self) -> None:
        super().__init__(converter=convert_picture)


def check_picture(path: Path) -> tuple[np.ndarray, int, int]:
    """Preflight read of a PNG/JPEG: decoded fully, converted through its mode as training does; 2D, channels last."""
    try:
        array = read_picture(path)
    except UnidentifiedImageError as err:
        raise ReadProblem("unreadable", "not a PNG/JPEG image") from err
    except (OSError, SyntaxError) as err:
        if "truncat" in str(err).lower():
            raise ReadProblem("truncated", "image file is cut short (truncated)") from err
        raise ReadProblem("unreadable", f"image cannot be decoded ({type(err).__name__})") from err
    return array, 2, 1


PICTURE = ImageFormat("PNG/JPEG", (".png", ".jpg", ".jpeg"), check=check_picture, reader=MedmetaPictureReader)
