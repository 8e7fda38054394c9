"""Colours as a photo viewer shows them: images in another RGB space than sRGB converted to sRGB as they are read.

SD was trained on, and its VAE decodes to, sRGB. A photo's pixel values are in the space its colour profile names:
an iPhone's Display P3 (an ICC profile in its HEIC or JPEG), Adobe RGB (an ICC profile, or, from a camera set to
Adobe RGB, only its EXIF: DCF's "option file", colour space uncalibrated and interoperability index R03), ProPhoto
from an editor. Read as if they were sRGB they look, and would train, duller. A viewer converts them; so does sdtune.
"""

from __future__ import annotations

import functools
import io
import struct

from .buckets import quiet_pil

EXIF_IFD, INTEROP_IFD = 0x8769, 0xA005
EXIF_COLOUR_SPACE, INTEROP_INDEX = 0xA001, 0x0001
UNCALIBRATED = 0xFFFF  # EXIF ColorSpace: not sRGB (which is 1)
DCF_ADOBE_RGB = "R03"  # the interoperability index of DCF's option file: Adobe RGB
# Adobe RGB (1998): its primaries' XYZ adapted to D50 and its gamma, 563/256, as Adobe's own profile gives them
ADOBE_RGB_PRIMARIES = ((0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457))
ADOBE_RGB_GAMMA = 563 / 256
D50 = (0.9642, 1.0, 0.8249)


def colour_profile(image) -> bytes | None:
    """The ICC profile of the space an opened image's pixels are in: the one it embeds, or Adobe RGB's where its EXIF
    says so without one (a camera set to Adobe RGB); None where neither says (sRGB is assumed, as viewers do)."""
    profile = image.info.get("icc_profile")
    if profile:
        return profile
    try:
        with quiet_pil():  # a corrupt EXIF block is named once, by data.readable_images
            exif = image.getexif()
            if exif.get_ifd(EXIF_IFD).get(EXIF_COLOUR_SPACE) != UNCALIBRATED:
                return None
            index = exif.get_ifd(INTEROP_IFD).get(INTEROP_INDEX)
    except Exception:  # PIL raises many kinds for a damaged EXIF block: no colour space is said then
        return None
    return adobe_rgb_profile() if isinstance(index, str) and index.strip("\0 ") == DCF_ADOBE_RGB else None


def in_srgb(image, profile: bytes | None):
    """An RGB image in sRGB: where `profile` (`colour_profile`) is another RGB space's (Display P3, Adobe RGB,
    ProPhoto), converted from it. No profile, an sRGB one, one of another colour space (a greyscale or CMYK one) or
    one ImageCms cannot read: the pixels as they are."""
    from PIL import ImageCms

    if not profile:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if source.profile.xcolor_space.strip() != "RGB" or "srgb" in (source.profile.profile_description or "").lower():
            return image  # an sRGB profile converts to (nearly) itself: spare the transform
        # perceptual: what viewers use; for the matrix profiles of cameras and phones it is relative colorimetric
        return ImageCms.profileToProfile(image, source, _srgb_profile(), ImageCms.Intent.PERCEPTUAL, outputMode="RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):  # a damaged profile
        return image


@functools.cache
def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def adobe_rgb_profile() -> bytes:
    """An ICC profile of Adobe RGB (1998): ImageCms builds only sRGB, Lab and XYZ ones itself."""
    return matrix_profile("Adobe RGB (1998)", ADOBE_RGB_PRIMARIES, ADOBE_RGB_GAMMA)


def matrix_profile(description: str, primaries, gamma: float) -> bytes:
    """A version 2 monitor ICC profile (RGB to XYZ) of a matrix and one gamma curve: `primaries` the red, green and
    blue XYZ, adapted to D50 (the profile connection space's white)."""

    def fixed(value: float) -> bytes:  # s15Fixed16Number
        return struct.pack(">i", round(value * 65536))

    def xyz(values) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(fixed(v) for v in values)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))  # one entry: a gamma, u8Fixed8Number
    text = description.encode("ascii") + b"\0"
    # textDescriptionType: the ASCII description, then empty Unicode and ScriptCode ones
    described = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [(b"desc", described), (b"wtpt", xyz(D50)), (b"rXYZ", xyz(primaries[0])), (b"gXYZ", xyz(primaries[1])),
            (b"bXYZ", xyz(primaries[2])), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
            (b"cprt", b"text" + bytes(4) + b"No copyright, use freely\0")]
    start = 128 + 4 + 12 * len(tags)  # header, tag count, tag table
    table, body = b"", b""
    for signature, data in tags:
        body += bytes(-(start + len(body)) % 4)  # each tag starts on a 4-byte boundary
        table += signature + struct.pack(">II", start + len(body), len(data))
        body += data
    header = (struct.pack(">I", start + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB " + b"XYZ "
              + bytes(12) + b"acsp" + bytes(24) + bytes(4) + xyz(D50)[8:] + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body
