"""Image files read as little as needed: headers, EXIF orientation, colour profile and truncation, once per file
(`image_facts`), no pixel decoded; PIL's opening with its decompression-bomb guard, and pillow-heif's HEIC opener."""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass
from pathlib import Path

from .colour import colour_profile
from .errors import quiet_pil, recorded_warnings, recording, warnings_per_thread

ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # PIL's modes with an alpha channel
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a photo is stored turned or mirrored


def upright_size(image) -> tuple[tuple[int, int], bool]:
    """An opened PIL image's (width, height) as it is shown, after its EXIF orientation, and whether it
    is stored turned by a quarter (then its stored width and height are swapped). A PNG not yet decoded is
    decoded to find an EXIF chunk after its pixels (PIL's way): `image_facts` reads a file's without decoding."""
    with quiet_pil():
        return _upright(image.size, image.getexif().get(EXIF_ORIENTATION, 1))


def _upright(size: tuple[int, int], orientation) -> tuple[tuple[int, int], bool]:
    turned = orientation in (5, 6, 7, 8)
    return (size[::-1] if turned else size), turned


@dataclass(frozen=True)
class ImageFacts:
    """What the start of a run needs of an image file, read from its header (and, for a PNG, its chunks' headers)
    once, no pixel decoded: `image_facts`."""

    format: str | None  # PIL's name of its format: "JPEG", "PNG", ...
    size: tuple[int, int]  # (width, height) as it is shown, its EXIF orientation applied
    turned: bool  # stored turned by a quarter: its stored width and height are `size` swapped
    mode: str  # PIL's mode of its pixels as stored ("RGB", "CMYK", "P", ...)
    alpha: bool  # it has an alpha channel, or a palette's transparency
    frames: int  # an animation's frames; a phone's MPO its images
    colour_profile: bytes | None  # the ICC profile of its pixels' colour space (colour.colour_profile), None for sRGB
    odd: str | None  # the first warning PIL gave reading its header and EXIF (a corrupt EXIF block), or None
    cut: str | None  # why it ends before its image does (a copy that stopped), or None


_FACTS: dict[tuple, ImageFacts] = {}  # by path and the file's identity: a file changed since is read again
FACTS_KEPT = 100_000  # files remembered at most (a few hundred bytes each)


def forget_image_facts() -> None:
    """Read every file again from here on (a run's planning starts so: a file rewritten in place within the clock's
    granularity keeps its size, time and inode)."""
    _FACTS.clear()


def image_facts(path) -> ImageFacts:
    """An image file's `ImageFacts`, read once per process and file version (kept by path, size, modification time
    and inode), so that checking, bucketing and framing a large folder reads each header once. Raises what PIL raises
    for a file that is no readable image, and DecompressionBombError where `open_image` would (never kept)."""
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    if key in _FACTS:
        return _FACTS[key]
    facts = _read_facts(path)
    if len(_FACTS) >= FACTS_KEPT:
        _FACTS.clear()
    _FACTS[key] = facts
    return facts


def _read_facts(path) -> ImageFacts:
    from PIL import Image

    heif_opener()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with Image.open(path) as image:  # reads the header alone
            refuse_bomb(image, said)  # over PIL's decompression-bomb limit, as open_image refuses it
            describe_colours(image, path)
            if image.format == "PNG":
                tail, cut = png_tail(path)
                image.info.update(tail)  # what PIL adds to it as it decodes the pixels
                exif = Image.Image.getexif(image)  # PIL's own reading of them, without PngImageFile's decode first
            else:
                exif = image.getexif()  # parsed as it opened (JPEG, WebP, HEIC), or read from its header (TIFF)
                cut = cut_short(path, image.format)
            size, turned = _upright(image.size, exif.get(EXIF_ORIENTATION, 1))
            alpha = image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
            facts = ImageFacts(image.format, size, turned, image.mode, alpha, getattr(image, "n_frames", 1),
                               colour_profile(image, exif), None, cut)
    odd = [w for w in said if issubclass(w.category, UserWarning) and not issubclass(w.category, Image.DecompressionBombWarning)]
    if odd:  # PIL's message, on one line
        facts = dataclasses.replace(facts, odd=" ".join((str(odd[0].message).strip().splitlines() or [""])[0][:100].split()))
    return facts


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TAIL_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")  # what PIL reads into `info` after the pixels as it decodes them
PNG_CUT = "cut short: it ends inside a chunk, as a copy or download that stopped leaves it"


def png_tail(path) -> tuple[dict, str | None]:
    """A PNG's chunks that PIL reads only as it decodes its pixels (EXIF and text after the image data, up to an
    animation's second frame, where PIL's decode stops), read by PIL's own chunk readers into what they add to the
    image's `info`; and why the file is cut short (it ends inside a chunk, or before its image data), or None. Only
    the chunks' headers are read on the way: the image data is skipped, not decoded. A file that ends between two
    chunks without its IEND is left to the decoder, which reads one whose image data is whole, as PIL does."""
    kept, after_pixels, reading = [], False, True
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            return {}, None
        while True:
            header = handle.read(8)
            if not header and after_pixels:
                break
            if len(header) < 8:
                return _tail_info(kept), PNG_CUT
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                break
            if handle.tell() + length + 4 > size:  # its data or CRC is not there
                return _tail_info(kept), PNG_CUT
            if kind == b"IDAT":
                after_pixels = True
            elif after_pixels and kind == b"fcTL":  # the next frame: PIL's decode of the first stops here
                reading = False
            elif after_pixels and reading and kind in PNG_TAIL_CHUNKS:
                kept.append((kind, handle.read(length)))
                length = 0
            handle.seek(length + 4, os.SEEK_CUR)  # past the data and its CRC
    return _tail_info(kept), None


def _tail_info(chunks: list[tuple[bytes, bytes]]) -> dict:
    import io

    from PIL import PngImagePlugin

    stream = PngImagePlugin.PngStream(io.BytesIO(b"".join(data for _, data in chunks)))
    for kind, data in chunks:
        stream.call(kind, 0, len(data))
    return stream.im_info


def open_image(path):
    """PIL's `Image.open` without PIL's own warnings (see quiet_pil): a JPEG's EXIF block is parsed as it opens.
    HEIC/HEIF photos open too where pillow-heif is installed (`heif_opener`). An image over PIL's decompression-bomb
    limit raises PIL's DecompressionBombError, but a JPEG below twice it (`refuse_bomb`). Its colour description
    where PIL reads none is added to its `info` (`describe_colours`)."""
    from PIL import Image

    heif_opener()
    record = recorded_warnings()
    if record is None:
        with quiet_pil(), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(path)
    else:  # on a thread decoding for the main one (`in_threads`): its warnings are recorded, none shown here
        start = len(record)
        image = Image.open(path)
        said, record[start:] = record[start:], []
    refuse_bomb(image, said)
    try:
        describe_colours(image, path)
    except OSError:  # the file went meanwhile
        image.close()
        raise
    for warning in said:  # any other warning is shown (or recorded) as it would have been
        if issubclass(warning.category, Image.DecompressionBombWarning):
            continue
        if record is None:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        else:
            record.append(warning)
    return image


def describe_colours(image, path) -> None:
    """Add to an opened image's `info` the nclx colour description (H.273 codes, as pillow-heif gives a HEIC's:
    `info["nclx_profile"]`) that its file gives and PIL does not read: a PNG's cICP chunk (PNG's third edition), which
    stands in place of its ICC profile and sRGB chunk (an iCCP beside it is left out); an AVIF's colr box of type nclx,
    where it has no ICC profile. A PNG's narrow-range values (video's 16 to 235) are marked `info["narrow_range"]`
    (data.to_rgb stretches them): an AVIF's decoder has stretched them already."""
    if image.format == "PNG":
        cicp = png_cicp(path)
        if cicp is not None:
            image.info.pop("icc_profile", None)
            image.info["nclx_profile"] = cicp
            if not cicp["full_range_flag"]:
                image.info["narrow_range"] = True
    elif image.format == "AVIF" and not image.info.get("icc_profile") and "nclx_profile" not in image.info:
        nclx = heif_nclx(path)
        if nclx is not None:
            image.info["nclx_profile"] = nclx


def nclx_fields(primaries: int, transfer: int, matrix: int, full_range: int) -> dict:
    """H.273 codes under pillow-heif's names for them."""
    return {"color_primaries": primaries, "transfer_characteristics": transfer, "matrix_coefficients": matrix,
            "full_range_flag": full_range}


PNG_HEADER_CHUNKS_READ = 1000  # a PNG's chunks walked at most looking for cICP (it comes before the image data)


def png_cicp(path) -> dict | None:
    """A PNG's cICP chunk (colour primaries, transfer function, matrix coefficients, full-range flag: H.273 codes),
    as `nclx_fields`, or None where it has none before its image data, or one a PNG may not hold (a matrix other than
    RGB's, a flag other than 0 or 1, a wrong length or checksum). Only the chunks' headers are read."""
    import zlib

    with open(path, "rb") as handle:
        if handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            return None
        for _ in range(PNG_HEADER_CHUNKS_READ):
            header = handle.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind != b"cICP":
                handle.seek(length + 4, os.SEEK_CUR)
                continue
            data, crc = handle.read(length), handle.read(4)
            if length != 4 or len(data) != 4 or crc != struct.pack(">I", zlib.crc32(kind + data)):
                return None
            primaries, transfer, matrix, full_range = data
            return nclx_fields(primaries, transfer, matrix, full_range) if matrix == 0 and full_range in (0, 1) else None
    return None


META_BYTES_READ = 16 * 2**20  # a HEIF's meta box holds item and property descriptions, some KB: larger is not read


def heif_nclx(path) -> dict | None:
    """The nclx colour description (a colr box of type nclx) of a HEIF file's primary image (an AVIF's), as
    `nclx_fields`, read from its boxes (ISO/IEC 23008-12: meta, its primary item pitm, item properties iprp: ipco and
    their associations ipma), without decoding; None where it has none, or its boxes do not read."""
    with open(path, "rb") as handle:
        while True:  # the top-level boxes: ftyp, meta, mdat, ...
            start = handle.tell()
            header = handle.read(8)
            if len(header) < 8:
                return None
            size, kind = struct.unpack(">I4s", header)
            if size == 1:  # a 64-bit size follows
                large = handle.read(8)
                if len(large) < 8:
                    return None
                size = struct.unpack(">Q", large)[0]
            elif size == 0:  # to the end of the file
                size = os.fstat(handle.fileno()).st_size - start
            if kind == b"meta":
                inside = size - (handle.tell() - start)
                if not 4 <= inside <= META_BYTES_READ:
                    return None
                meta = handle.read(inside)
                return _meta_nclx(meta[4:]) if len(meta) == inside else None  # past the full box's version and flags
            if size < 8:
                return None
            handle.seek(start + size)


def _boxes(data: bytes):
    """(type, payload) of each box in `data`, the boxes one after another; stops at one that does not fit."""
    position = 0
    while position + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1 and position + 16 <= len(data):
            size, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        elif size == 0:
            size = len(data) - position
        if size < header or position + size > len(data):
            return
        yield kind, data[position + header : position + size]
        position += size


def _meta_nclx(meta: bytes) -> dict | None:
    primary, properties, associations = None, [], {}
    for kind, payload in _boxes(meta):
        if kind == b"pitm" and len(payload) >= (6 if payload[:1] == b"\0" else 8):  # its item's ID: 2 bytes, 4 from version 1
            primary = struct.unpack_from(">H" if payload[0] == 0 else ">I", payload, 4)[0]
        elif kind == b"iprp":
            for inner, content in _boxes(payload):
                if inner == b"ipco":
                    properties = list(_boxes(content))
                elif inner == b"ipma":
                    associations.update(_item_properties(content))
    nclx = [index for index, (kind, payload) in enumerate(properties, 1) if kind == b"colr" and payload[:4] == b"nclx"
            and len(payload) >= 11]
    if not nclx:
        return None
    own = [index for index in associations.get(primary, ()) if index in nclx]
    if associations and primary is not None and not own:  # the primary image has none (another item has)
        return None
    payload = properties[(own or nclx)[0] - 1][1]
    primaries, transfer, matrix = struct.unpack_from(">HHH", payload, 4)
    return nclx_fields(primaries, transfer, matrix, payload[10] >> 7)


def _item_properties(ipma: bytes) -> dict[int, list[int]]:
    """An ipma box's associations: each item's property indices (into ipco, from 1)."""
    if len(ipma) < 8:
        return {}
    version, flags = ipma[0], int.from_bytes(ipma[1:4], "big")
    position, items = 8, {}
    for _ in range(struct.unpack_from(">I", ipma, 4)[0]):
        id_bytes = 2 if version < 1 else 4
        index_bytes = 2 if flags & 1 else 1
        if position + id_bytes + 1 > len(ipma):
            break
        item = int.from_bytes(ipma[position : position + id_bytes], "big")
        count = ipma[position + id_bytes]
        position += id_bytes + 1
        if position + count * index_bytes > len(ipma):
            break
        mask = 0x7FFF if index_bytes == 2 else 0x7F  # the top bit: the property is essential
        items[item] = [int.from_bytes(ipma[position + i * index_bytes : position + (i + 1) * index_bytes], "big") & mask
                       for i in range(count)]
        position += count * index_bytes
    return items


DRAFT_FORMATS = ("JPEG", "MPO")  # decoded at a fraction of their size (PIL's draft: 1/2, 1/4, 1/8) where that covers the training size


def refuse_bomb(image, said) -> None:
    """Raise PIL's DecompressionBombError for an image PIL warned of, as over its limit (`said`: the warnings its
    opening gave; over twice the limit PIL raises itself), and close it; but keep a JPEG: it is decoded at a fraction
    of its size, and refused only if that still is over the limit (data.load_framed_sizes). A 100-megapixel camera's
    photo (Fujifilm GFX, Hasselblad X2D) is just over the limit, and a JPEG's draft decodes it at 1/8, 1.6 megapixels."""
    from PIL import Image

    bombs = [warning for warning in said if issubclass(warning.category, Image.DecompressionBombWarning)]
    if bombs and image.format not in DRAFT_FORMATS:
        image.close()
        raise Image.DecompressionBombError(str(bombs[0].message))


@functools.cache
def heif_opener() -> bool:
    """Whether PIL reads HEIC/HEIF photos (an iPhone's): pillow-heif, where installed (`pip install 'sdtune[heif]'`),
    registers its opener once. It applies the photo's rotation and mirroring as it decodes, and sets the EXIF
    orientation it hands PIL to 1, so the photo is not turned twice; it opens the primary image of several."""
    try:
        import pillow_heif
    except (ImportError, OSError):  # not installed, or its libheif cannot load
        return False
    pillow_heif.register_heif_opener()
    return True


TAIL_BYTES = 4096  # a whole JPEG's end is looked for here first: past it only where something follows the image
CHUNK_BYTES = 2**20
JPEG_END = b"\xff\xd9"  # EOI; in the entropy-coded data an FF byte is followed by 00 or a restart marker only


def cut_short(path: Path, image_format: str | None) -> str | None:
    """Why a JPEG or PNG whose header reads ends before its image does (a copy or download interrupted), or None;
    found from its bytes, without decoding. A JPEG: no end-of-image marker after its first scan starts, looked for in
    the last few KB, then, where something follows the image (a phone's motion photo carries its video there), from
    the first scan on. A PNG: its chunks, walked by their lengths, end inside one (`png_tail`).
    PIL parses a WebP whole as it opens, so one cut is found by its header already; other formats fail as they are
    decoded."""
    if image_format == "PNG":
        return png_tail(path)[1]
    if image_format not in ("JPEG", "MPO"):
        return None
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start = _jpeg_scan_start(handle)
        if start is None:
            return None  # markers PIL read past but this walk does not: left to the decoder
        handle.seek(max(start, size - TAIL_BYTES))
        if JPEG_END in handle.read():
            return None
        handle.seek(start)
        carried = b""
        while chunk := handle.read(CHUNK_BYTES):
            if JPEG_END in carried + chunk:
                return None
            carried = chunk[-(len(JPEG_END) - 1):]
    return "cut short: no end-of-image marker (FF D9) after its data, as a copy or download that stopped leaves it"


def _jpeg_scan_start(handle) -> int | None:
    """The offset of a JPEG's first scan data (after its first SOS segment), walking the segments from its start,
    so that an embedded thumbnail's own end marker (in EXIF) is passed over; None where the walk fails."""
    handle.seek(2)  # past SOI
    while True:
        marker = handle.read(2)
        while len(marker) == 2 and marker == b"\xff\xff":  # fill bytes before a marker
            marker = b"\xff" + handle.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if 0xD0 <= marker[1] <= 0xD7 or marker[1] == 0x01:  # standalone markers: no length
            continue
        length = int.from_bytes(handle.read(2), "big")
        if length < 2:
            return None
        if marker[1] == 0xDA:  # SOS: its header, then the scan
            return handle.tell() + length - 2
        handle.seek(length - 2, os.SEEK_CUR)


# each thread holds one image decoded whole (a 48-megapixel PNG: 144 MB), and the Python between PIL's calls (about
# 15% of the work) bounds the gain: at most 3.9x at 8 threads, 4.7x at 16
DECODE_THREADS_MAX = 8


def decode_threads() -> int:
    """The threads that decode images at a run's start (`in_threads`): the cores this process may run on (its CPU
    affinity: a container's or `taskset`'s share, not the machine's count; torch's threads where the system does not
    say), at most DECODE_THREADS_MAX; 1 on one core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        import torch

        cores = torch.get_num_threads()
    return max(1, min(cores, DECODE_THREADS_MAX))


def in_threads(work, items: list, threads: int) -> list[tuple]:
    """`work(item)` for each item, on `threads` threads (PIL lets go of the GIL while it decodes and resizes), as
    (result, error, warnings) in the items' order: `error` what it raised (then `result` is None), `warnings` what it
    warned, recorded to be raised again in order by the caller (errors.warn_again), after this returns, so that they
    are the same, in the same order, whatever the threads. After an item's error, the items not yet begun are not,
    and the list ends there."""
    heif_opener()  # registered once, before the threads open files

    def recorded(item):
        with recording() as said:
            try:
                return work(item), None, said
            except Exception as error:
                return None, error, said

    done = []
    with warnings_per_thread():
        if threads <= 1:
            for item in items:
                done.append(recorded(item))
                if done[-1][1] is not None:
                    break
            return done
        with ThreadPoolExecutor(threads, thread_name_prefix="sdtune-decode") as pool:
            # each in a copy of this thread's context: its warnings name settings as the call in progress does
            futures = [pool.submit(copy_context().run, recorded, item) for item in items]
            try:
                for future in futures:
                    done.append(future.result())
                    if done[-1][1] is not None:
                        break
            finally:
                for future in futures:
                    future.cancel()
    return done
