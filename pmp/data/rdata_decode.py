"""Decode R data files (.rds/.rda and lazy-load databases) into Python objects, so the books need no R install.

The R packages ship their texts as serialized R objects; `rdata` parses one serialized object, and
`lazyload` finds and decompresses one variable of a lazy-load database (the .rdx index + .rdb payloads).
"""

from __future__ import annotations

import bz2
import lzma
import warnings
import zlib

import rdata


def r_convert(blob: bytes, rds: bool = True):
    """One serialized R object (.rds, or an .rda file when `rds` is False) -> Python (lists, dicts, DataFrames)."""
    with warnings.catch_warnings():  # rdata warns about the .rdx extension and unknown R classes
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(blob, extension=".rds" if rds else ".rda")
        return rdata.conversion.convert(parsed)


def lazyload(rdx: bytes, rdb: bytes, name: str):
    """One variable of an R lazy-load database: the .rdx index (an RDS file) maps each variable to an
    (offset, length) in the .rdb; each entry is a 4-byte big-endian length then a compressed serialized object.
    Compression 1 = zlib; 2/3 = one type byte (Z = raw LZMA2, 2 = bzip2, 1 = zlib, 0 = none) then the payload."""
    index = r_convert(rdx)
    compressed = int(index["compressed"][0]) if "compressed" in index else 1
    off, length = (int(v) for v in index["variables"][name])
    body = rdb[off + 4:off + length]
    kind = b"1"
    if compressed in (2, 3):
        kind, body = body[:1], body[1:]
    decompress = {b"Z": lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]),
                  b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}
    if kind not in decompress:
        raise RuntimeError(f"unknown R lazy-load compression type {kind!r} for {name}")
    return r_convert(decompress[kind](body))
