"""Reading the user's photos: JPEG, PNG or WebP in, an oriented 8-bit RGB PIL image out; and writing an
edited copy back in the photo's own format.

Every refusal is one line naming the file. Only Pillow's JPEG, PNG and WebP parsers are ever run on a
file, and the pixel count its header declares is checked before any pixel is decoded, so a small file
cannot make the reader allocate gigabytes (a decompression bomb).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cfdeploy.errors import CfdeployError
from cfdeploy.files import require_file

MAX_PHOTO_PIXELS = 50_000_000  # 50 MP: above every phone camera; a decoded 50 MP RGB photo takes 150 MB
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow's names; JPEG includes the MPO files phones write
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # "I": 16-bit grey PNGs before Pillow 10.4
PALETTE_MODES = frozenset({"P", "PA"})
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what Pillow raises for damaged data
RGB_PROFILE_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA"})  # sources whose ICC profile describes RGB pixels
ORIENTATION_TAG = 0x0112
DEFAULT_JPEG_QUALITY = 95


@dataclass(frozen=True, eq=False)  # compared by identity: images have no single truth value
class Photo:
    """A decoded photo and what an edited copy of it keeps.

    ``image`` is upright RGB (EXIF orientation applied); ``alpha`` its transparency, upright too, or None;
    ``format`` what an edited copy is written as (``JPEG`` for phones' MPO files); ``icc_profile`` the
    colour profile when it describes RGB pixels (a CMYK or grey profile cannot describe the RGB copy);
    ``exif`` the EXIF block without its orientation tag, since the pixels are upright now.
    """

    image: Image.Image
    alpha: Image.Image | None
    format: str
    icc_profile: bytes | None
    exif: bytes | None
    source: str


@dataclass(frozen=True)
class PhotoEncoding:
    """How an edited copy is encoded: JPEG quality, PNG zlib level, and whether EXIF (GPS included) is kept."""

    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    png_compression: int = 6
    keep_metadata: bool = False


def load_photo(path: Path, max_pixels: int = MAX_PHOTO_PIXELS) -> Image.Image:
    """The photo at ``path`` as an RGB image, EXIF orientation applied, detached from the file.

    The size is checked against ``max_pixels`` from the header, before decoding; Pillow's own
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 MP by default) refuses larger headers first.
    """
    return read_photo(path, max_pixels).image


def read_photo(path: Path, max_pixels: int = MAX_PHOTO_PIXELS) -> Photo:
    """:func:`load_photo` with the transparency, colour profile, format and EXIF an edited copy keeps."""
    require_file(path)
    return _decode(path, str(path), max_pixels)


def photo_from_bytes(content: bytes, source: str, max_pixels: int = MAX_PHOTO_PIXELS) -> Photo:
    """:func:`read_photo` for an encoded photo that came over the network (``source`` names it in errors)."""
    return _decode(io.BytesIO(content), source, max_pixels)


def save_photo(stream: BinaryIO, photo: Photo, pixels: np.ndarray, encoding: PhotoEncoding = PhotoEncoding()) -> None:
    """Write ``pixels`` (``[H, W, 3]`` uint8, upright, the photo's size) as an edited copy of ``photo``.

    Same format (JPEG at ``jpeg_quality``, PNG at ``png_compression``, WebP lossless), the photo's alpha
    and colour profile, no orientation tag; EXIF only with ``keep_metadata``.
    """
    image = Image.fromarray(pixels, "RGB")
    if image.size != photo.image.size:
        raise ValueError(f"save_photo: pixels of {image.size}, the photo is {photo.image.size}")
    if photo.alpha is not None and photo.format != "JPEG":
        image.putalpha(photo.alpha)
    options: dict[str, object] = {}
    if photo.icc_profile:
        options["icc_profile"] = photo.icc_profile
    if encoding.keep_metadata and photo.exif:
        options["exif"] = photo.exif
    if photo.format == "JPEG":
        options["quality"] = encoding.jpeg_quality
    elif photo.format == "PNG":
        options["compress_level"] = encoding.png_compression
    else:
        options |= {"lossless": True, "exact": True}  # exact: colours under fully transparent pixels kept too
    try:
        image.save(stream, format=photo.format, **options)
    except ValueError as error:  # Pillow's refusal of an EXIF block over the format's limit
        if "exif" not in options:
            raise
        raise CfdeployError(
            f"{photo.source}: its EXIF block cannot be written back into a {photo.format} ({error}); "
            "run without --keep-metadata"
        ) from None


def _decode(opened: Path | BinaryIO, source: str, max_pixels: int) -> Photo:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(opened, formats=PHOTO_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise CfdeployError(
                f"{source}: the header declares more than {Image.MAX_IMAGE_PIXELS:,} pixels; "
                f"photos may have at most {max_pixels:,} (a decompression bomb?)"
            ) from None
        except UnidentifiedImageError:
            raise CfdeployError(f"{source}: not a JPEG, PNG or WebP image, or its header is damaged") from None
        except DECODE_ERRORS as error:
            raise CfdeployError(f"{source}: the image header is damaged: {error}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise CfdeployError(
                f"{source}: the header declares {width}x{height} = {width * height:,} pixels; "
                f"photos may have at most {max_pixels:,} (a decompression bomb?)"
            )
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return Photo(
                as_rgb(upright),
                _alpha(upright),
                "JPEG" if image.format == "MPO" else str(image.format),
                image.info.get("icc_profile") if image.mode in RGB_PROFILE_MODES else None,
                _exif_without_orientation(image),
                source,
            )
        except DECODE_ERRORS as error:
            raise CfdeployError(f"{source}: the image data is truncated or damaged: {error}") from None


def _alpha(image: Image.Image) -> Image.Image | None:
    """The image's transparency as an ``L`` image, or None where it has none."""
    if "A" in image.getbands():
        return image.getchannel("A")
    if "transparency" in image.info and image.mode in SIXTEEN_BIT_MODES:  # one grey value marks transparency
        opaque = np.asarray(image) != image.info["transparency"]
        return Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8), "L")
    if "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def _exif_without_orientation(image: Image.Image) -> bytes | None:
    exif = image.getexif()
    exif.pop(ORIENTATION_TAG, None)
    return exif.tobytes() if len(exif) else None


def as_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB copy of ``image``.

    Alpha is dropped as the official ``.convert('RGB')`` drops it; 16-bit grey is scaled to 8 bits
    (value / 257, so 65535 → 255), where Pillow's own conversion would clip everything above 255 to white.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in PALETTE_MODES:
        return image.convert("RGBA").convert("RGB")  # via RGBA: same colours, no warning about transparency
    if image.mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def photo_paths(arguments: list[Path]) -> list[Path]:
    """The photos named on the command line: files as given, directories' photos in name order.

    A directory contributes its entries with a photo suffix (case-insensitive), not recursing and
    skipping hidden names (such as the ``._x.jpg`` files macOS leaves on shared drives). Every path
    must be a regular file, checked here so a bad argument stops the run before any model loads.
    """
    paths: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            paths.extend(_directory_photos(argument))
        else:
            paths.append(require_file(argument))
    if not paths:
        named = ", ".join(str(argument) for argument in arguments) or "nothing"
        raise CfdeployError(f"no JPEG, PNG or WebP photos in {named}")
    return paths


def _directory_photos(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise CfdeployError(f"{directory}: cannot be listed: {error.strerror}") from None
    return [
        require_file(entry)
        for entry in entries
        if entry.suffix.lower() in PHOTO_SUFFIXES and not entry.name.startswith(".") and not entry.is_dir()
    ]
