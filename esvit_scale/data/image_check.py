"""Cheap host-side checks of an encoded image before it reaches DALI, and a DALI probe decode.

A DALI decode error is fatal to the whole pipeline ("Current pipeline object is no longer valid"), so what
can be caught cheaply is caught here, per file, as it is read: unreadable or empty files, names that are not
images by their content, formats DALI does not decode, and truncated JPEG / PNG files (no end marker).
What only a decode can find (a corrupt JPEG body) is found by `probe_decode` after a pipeline error.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL format names that DALI's image decoder reads (docs: JPEG, JPEG 2000, TIFF, PNG, BMP, PNM, WebP)
DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
_JPEG_TAIL = 4096      # the EOI marker must be in the last bytes (some cameras append padding)


class UnusableImage(Exception):
    """A file that cannot be fed to the decoder; str() is the reason."""


@dataclass
class Encoded:
    data: np.ndarray     # the file's bytes, uint8
    width: int
    height: int


def read_encoded(source, i: int) -> Encoded:
    """Sample i of a data source (data/source.py): its bytes and pixel size, or UnusableImage(reason)."""
    try:
        raw = source.read(i)
    except OSError as e:
        raise UnusableImage(f"cannot read: {e.strerror or e}") from None
    if not raw:
        raise UnusableImage("empty file")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt, (width, height) = img.format, img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnusableImage(f"not a readable image ({type(e).__name__}: {e})") from None
    if fmt not in DALI_FORMATS:
        raise UnusableImage(f"format {fmt} is not decoded by DALI")
    if width < 1 or height < 1:
        raise UnusableImage(f"empty image {width}x{height}")
    if fmt in ("JPEG", "MPO") and raw.rfind(b"\xff\xd9", max(0, len(raw) - _JPEG_TAIL)) < 0:
        raise UnusableImage("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in raw[-64:]:
        raise UnusableImage("truncated PNG (no IEND chunk)")
    return Encoded(np.frombuffer(raw, np.uint8), width, height)


def probe_decode(data: np.ndarray, device_id: int | None = None) -> str | None:
    """Decode one image with DALI alone (mixed on a GPU, else CPU); the error text, or None if it decodes."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def probe():
        encoded = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        return fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                 output_type=types.RGB, adjust_orientation=False)

    pipe = probe()
    try:
        pipe.build()
        pipe.run()
    except Exception as e:   # DALI raises RuntimeError; anything else is as fatal to the batch
        return str(e).strip().splitlines()[-1][:300]
    finally:
        del pipe
    return None


def check_image(source, i: int, device_id: int | None = None) -> Encoded:
    """read_encoded plus a real decode: the startup test that the source has a usable image."""
    enc = read_encoded(source, i)
    err = probe_decode(enc.data, device_id)
    if err is not None:
        raise UnusableImage(f"decode failed: {err}")
    return enc
