"""Colours as a photo viewer shows them: images in another RGB space than sRGB converted to sRGB as they are read.

SD was trained on, and its VAE decodes to, sRGB. A photo's pixel values are in the space its colour profile names:
an iPhone's Display P3 (an ICC profile in its HEIC or JPEG), Adobe RGB (an ICC profile, or, from a camera set to
Adobe RGB, only its EXIF: DCF's "option file", colour space uncalibrated and interoperability index R03), ProPhoto
from an editor; or, in a HEIC or AVIF photo, an nclx box (ITU-T H.273 codes: Display P3 primaries, the sRGB curve)
instead of an ICC profile, in a PNG a cICP chunk of the same codes (which stands in place of its ICC profile). Read as if they were sRGB they look, and would train, duller. A viewer converts them; so
does sdtune.

CMYK JPEGs (print files) are converted by their ICC profile where they embed one; else by PIL's plain formula. PIL reads
every CMYK JPEG as Adobe's software writes it, each value inverted, as the APP14 "Adobe" marker says; one without that
marker (written by other software) holds its values as they are and would come out as a negative: it is inverted back.
"""

from __future__ import annotations

import functools
import io
import struct
import threading

from .errors import quiet_pil

EXIF_IFD, INTEROP_IFD = 0x8769, 0xA005
EXIF_COLOUR_SPACE, INTEROP_INDEX = 0xA001, 0x0001
UNCALIBRATED = 0xFFFF  # EXIF ColorSpace: not sRGB (which is 1)
DCF_ADOBE_RGB = "R03"  # the interoperability index of DCF's option file: Adobe RGB
# Adobe RGB (1998): its primaries' XYZ adapted to D50 and its gamma, 563/256, as Adobe's own profile gives them
ADOBE_RGB_PRIMARIES = ((0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457))
ADOBE_RGB_GAMMA = 563 / 256
D50 = (0.9642, 1.0, 0.8249)


def colour_profile(image, exif=None) -> bytes | None:
    """The ICC profile of the space an opened image's pixels are in: the one it embeds; one made from its nclx colour
    description (a HEIC's, as pillow-heif gives it; an AVIF's nclx box or a PNG's cICP chunk, which
    image_files.describe_colours adds: `nclx_icc`); or Adobe RGB's where its EXIF (`exif`, else
    the image's own) says so without one (a camera set to Adobe RGB); None where none says (sRGB is assumed, as
    viewers do)."""
    profile = image.info.get("icc_profile")
    if profile:
        return profile
    nclx = image.info.get("nclx_profile")
    if isinstance(nclx, dict):
        return nclx_icc(tuple(sorted(nclx.items())))
    try:
        with quiet_pil():  # a corrupt EXIF block is named once, by data.readable_images
            exif = image.getexif() if exif is None else exif
            if exif.get_ifd(EXIF_IFD).get(EXIF_COLOUR_SPACE) != UNCALIBRATED:
                return None
            index = exif.get_ifd(INTEROP_IFD).get(INTEROP_INDEX)
    except Exception:  # PIL raises many kinds for a damaged EXIF block: no colour space is said then
        return None
    return adobe_rgb_profile() if isinstance(index, str) and index.strip("\0 ") == DCF_ADOBE_RGB else None


def plain_cmyk(image) -> bool:
    """Whether an opened image is a CMYK JPEG without Adobe's APP14 marker: its values stored as they are, which PIL
    reads inverted, as it reads every CMYK JPEG (Adobe's convention); see `cmyk_to_rgb`."""
    return image.mode == "CMYK" and image.format in ("JPEG", "MPO") and "adobe" not in image.info


def cmyk_to_rgb(image, profile: bytes | None, inverted: bool = False):
    """A CMYK image as sRGB: by its CMYK ICC `profile` where it has one ImageCms reads, else by PIL's formula;
    `inverted` (`plain_cmyk`): its values as PIL read them are each 255 minus the file's, and are turned back first."""
    from PIL import ImageChops, ImageCms

    if inverted:
        image = ImageChops.invert(image)
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            if source.profile.xcolor_space.strip() == "CMYK":
                return ImageCms.profileToProfile(image, source, _srgb_profile(), ImageCms.Intent.PERCEPTUAL, outputMode="RGB")
        except (OSError, ValueError, ImageCms.PyCMSError):  # a damaged profile: the formula
            pass
    return image.convert("RGB")


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


_PER_THREAD = threading.local()  # images are converted on several threads at a run's start (data.load_framed_images)


def _srgb_profile():
    """LittleCMS's sRGB profile, one per thread: a transform reads (and caches into) its profiles as it is built."""
    profile = getattr(_PER_THREAD, "srgb", None)
    if profile is None:
        from PIL import ImageCms

        profile = _PER_THREAD.srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return profile


@functools.cache
def adobe_rgb_profile() -> bytes:
    """An ICC profile of Adobe RGB (1998): ImageCms builds only sRGB, Lab and XYZ ones itself."""
    return matrix_profile("Adobe RGB (1998)", ADOBE_RGB_PRIMARIES, ADOBE_RGB_GAMMA)


# ITU-T H.273 colour primaries sdtune converts from where an nclx box names them without their coordinates (pillow-heif
# gives these too): red, green, blue and white (x, y)
NCLX_PRIMARIES = {
    9: ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046), (0.3127, 0.3290)),  # BT.2020
    11: ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), (0.314, 0.351)),  # DCI-P3 (SMPTE RP 431-2)
    12: ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), (0.3127, 0.3290)),  # Display P3 (SMPTE EG 432-1)
}
NCLX_SRGB_PRIMARIES = (1, 2)  # BT.709 (sRGB's) and unspecified: read as sRGB
NCLX_SRGB_TRANSFERS = (1, 2, 6, 13, 14, 15)  # sRGB's curve, BT.709's (shown as sRGB by viewers), unspecified


def _srgb_decode(value: float) -> float:
    return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4


# H.273 transfer characteristics: encoded value (0..1) to linear light. BT.709's (1, 6, 14, 15), a camera's curve, is
# shown by viewers as sRGB's, and read so; PQ and HLG (HDR) are left as they are
NCLX_TRANSFERS = {1: _srgb_decode, 2: _srgb_decode, 4: lambda v: v**2.2, 5: lambda v: v**2.8, 6: _srgb_decode,
                  8: lambda v: v, 13: _srgb_decode, 14: _srgb_decode, 15: _srgb_decode}
BRADFORD = ((0.8951, 0.2664, -0.1614), (-0.7502, 1.7135, 0.0367), (0.0389, -0.0685, 1.0296))


@functools.cache
def nclx_icc(nclx: tuple) -> bytes | None:
    """An ICC profile of the colour space an nclx box describes (`nclx`: the sorted items of pillow-heif's
    `info["nclx_profile"]`: H.273 `color_primaries`, `transfer_characteristics`, and the primaries' coordinates
    `color_primary_red_x`, ...): None for sRGB's own (BT.709 primaries, or unspecified), for an HDR curve (PQ, HLG) or
    primaries it does not know."""
    import numpy as np

    fields = dict(nclx)
    primaries, transfer = fields.get("color_primaries"), fields.get("transfer_characteristics")
    if primaries in NCLX_SRGB_PRIMARIES and transfer in NCLX_SRGB_TRANSFERS:
        return None
    decode = NCLX_TRANSFERS.get(transfer)
    corners = ("red", "green", "blue", "white")
    if all(f"color_primary_{corner}_{axis}" in fields for corner in corners for axis in "xy"):
        xy = [(fields[f"color_primary_{corner}_x"], fields[f"color_primary_{corner}_y"]) for corner in corners]
    else:
        xy = NCLX_PRIMARIES.get(primaries)
    if decode is None or xy is None or any(y <= 0 for _, y in xy):
        return None

    def to_xyz(x: float, y: float):
        return np.array([x / y, 1.0, (1 - x - y) / y])

    columns = np.stack([to_xyz(*point) for point in xy[:3]], axis=1)
    white = to_xyz(*xy[3])
    to_white = columns * np.linalg.solve(columns, white)  # each primary scaled so that together they give white
    bradford = np.array(BRADFORD)  # then adapted from the space's white to D50, the profile connection space's
    adapt = np.linalg.inv(bradford) @ np.diag((bradford @ np.array(D50)) / (bradford @ white)) @ bradford
    adapted = adapt @ to_white
    curve = [decode(index / (CURVE_POINTS - 1)) for index in range(CURVE_POINTS)]
    return matrix_profile(f"nclx primaries {primaries} transfer {transfer}", [tuple(adapted[:, i]) for i in range(3)], curve)


CURVE_POINTS = 1024  # a tone curve's table entries (curveType)


def matrix_profile(description: str, primaries, gamma) -> bytes:
    """A version 2 monitor ICC profile (RGB to XYZ) of a matrix and one tone curve: `primaries` the red, green and
    blue XYZ, adapted to D50 (the profile connection space's white); `gamma` a power, or a table of the curve's
    linear values (0..1) at evenly spaced encoded ones."""

    def fixed(value: float) -> bytes:  # s15Fixed16Number
        return struct.pack(">i", round(value * 65536))

    def xyz(values) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(fixed(v) for v in values)

    if isinstance(gamma, (int, float)):
        curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))  # one entry: a gamma, u8Fixed8Number
    else:
        table = [min(65535, max(0, round(value * 65535))) for value in gamma]
        curve = b"curv" + bytes(4) + struct.pack(f">I{len(table)}H", len(table), *table)
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
