"""Normalize raw source text, so every cached file has one form whatever its source's line ends and encoding."""

from __future__ import annotations

import re


def decode_text(blob: bytes) -> str:
    """UTF-8, or latin-1 where a file is not valid UTF-8 (every byte string decodes as latin-1)."""
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return blob.decode("latin-1")


def clean_text(text: str) -> str:
    """LF line ends, no trailing spaces, paragraphs separated by exactly one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's START and END markers, without the credits line after START."""
    start = re.search(r"\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"(End of (the )?Project Gutenberg|\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG)", text)
    if not start or not end:
        raise RuntimeError("Moby Dick from r-cran-tokenizers lost its Gutenberg markers: the package changed")
    body = text[start.end():end.start()]
    produced = re.match(r"\s*Produced by[^\n]*\n", body)  # the credits line right after the START marker
    return body[produced.end():] if produced else body
