"""Generic text an evaluation reads: a file of the user's, or a part of the public default corpus from the data
cache. Loaded lazily; checked at input time, so that nothing is written before a missing file is reported; its
digest identifies it in the inputs of the cells that use it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from pmp.data.cache import is_prepared
from pmp.data.files import chunk_text

CHUNK_CHARS = 2_000  # text pieces below any model's maximum length


class TextSource:
    """`path` (a file) or, when empty, `public()` -> documents of the public corpus (`public_label` names them in
    records, `public_digest` in cell inputs). `flag`: the option that sets `path`, for messages."""

    def __init__(self, path: str, cache_dir: str, flag: str, public_label: str, public_digest: str,
                 public: Callable[[str], list[str]]):
        self.path, self.cache_dir, self.flag = path, cache_dir, flag
        self._public_label, self._public_digest, self._public = public_label, public_digest, public
        self._texts: list[str] | None = None

    @property
    def source(self) -> str:
        return f"file {self.path}" if self.path else self._public_label

    def check_file(self) -> None:
        """A given file must exist and hold text."""
        if self.path:
            p = Path(self.path)
            if not p.is_file():
                raise FileNotFoundError(f"{self.flag} {p} does not exist")
            if not p.read_text("utf-8", errors="replace").strip():
                raise ValueError(f"{self.flag} {p} holds no text")

    def missing(self) -> str:
        """Why no text is available ('' = it is)."""
        if self.path or is_prepared(self.cache_dir):
            return ""
        return f"no text: pass {self.flag} FILE or prepare the data cache (`pmp data prepare`) for the public corpus"

    def digest(self) -> str:
        """Identifies the text in a cell's inputs: the file's sha256 (16 hex digits), or the public part's name."""
        if not self.path:
            return self._public_digest
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]

    def texts(self) -> list[str]:
        if self._texts is None:
            docs = ([Path(self.path).read_text("utf-8", errors="replace")] if self.path else
                    self._public(self.cache_dir))
            self._texts = [c for d in docs for c in chunk_text(str(d), CHUNK_CHARS)]
        return self._texts
