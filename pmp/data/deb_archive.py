"""Read files out of a Debian package (.deb) without dpkg, so preparing the data works on any OS.

A .deb is an ``ar`` archive whose ``data.tar.*`` member holds the installed files.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def read_deb_members(deb: Path, members: list[str]) -> dict[str, bytes]:
    """Read `members` from a .deb (an `ar` archive holding data.tar.*) without dpkg."""
    data = deb.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise RuntimeError(f"{deb} is not a Debian package (bad ar magic); delete it and run prepare again")
    pos, tar_bytes = 8, None
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        if name.startswith("data.tar"):
            tar_bytes = data[pos + 60:pos + 60 + size]
            break
        pos += 60 + size + (size & 1)
    if tar_bytes is None:
        raise RuntimeError(f"{deb} holds no data.tar member; delete it and run prepare again")
    try:
        tf = tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:*")
    except tarfile.CompressionError as e:  # e.g. data.tar.zst on Python < 3.14
        raise RuntimeError(f"cannot decompress {deb}: {e}") from None
    out = {}
    with tf:
        names = {m.name.removeprefix("./"): m for m in tf.getmembers()}
        for member in members:
            if member not in names:
                raise RuntimeError(f"{deb} lacks {member}: the package layout changed")
            out[member] = tf.extractfile(names[member]).read()
    return out
