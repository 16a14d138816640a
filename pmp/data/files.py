"""User-supplied local files (txt / jsonl / json / csv / tsv / parquet), read through `datasets`.

`datasets` is run with a throwaway cache directory and ``keep_in_memory=True``: a user's corpus file is read
once per run and then lives on as cached token blocks, so converting it to Arrow under ~/.cache/huggingface
would only leave a stale copy behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import datasets

# extension -> (datasets builder, extra builder kwargs)
FORMATS = {
    ".txt": ("text", {"sample_by": "document"}),
    ".text": ("text", {"sample_by": "document"}),
    ".md": ("text", {"sample_by": "document"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
}
CHUNK_CHARS = 20_000  # documents longer than this are cut at paragraph boundaries (a meaningful val split)


class Document(str):
    """A str that remembers where it came from (``.source``: a book name, file path or dataset), so a
    document-level split can keep every source in the validation set."""

    source: str

    def __new__(cls, text: str, source: str = ""):
        doc = super().__new__(cls, text)
        doc.source = source
        return doc

    def __reduce__(self):
        return Document, (str(self), self.source)


def chunk_text(text: str, target_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about `target_chars` (at least, except the last) at blank-line paragraph
    boundaries; a paragraph longer than 2x the target is cut at line breaks, a line longer still by characters.
    Concatenating the pieces with '\\n\\n' gives the text back up to whitespace at the cuts."""
    if target_chars < 1:
        raise ValueError(f"target_chars must be >= 1, got {target_chars}")
    units: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= 2 * target_chars:
            units.append(para)
            continue
        for line in para.split("\n"):
            units += [line[i:i + target_chars] for i in range(0, len(line), target_chars)] or [""]
    chunks, cur, size = [], [], 0
    for u in units:
        cur.append(u)
        size += len(u) + 2
        if size >= target_chars:
            chunks.append("\n\n".join(cur).strip("\n"))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur).strip("\n")
        if chunks and len(tail) < target_chars // 4:  # no tiny last piece
            chunks[-1] = chunks[-1] + "\n\n" + tail
        else:
            chunks.append(tail)
    return [c for c in chunks if c.strip()]


def _format(path: str | Path) -> tuple[Path, str, dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    ext = p.suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"unsupported file type {ext!r} for {p}; supported: {', '.join(sorted(FORMATS))}")
    builder, kw = FORMATS[ext]
    return p, builder, kw


def read_file(path: str | Path) -> datasets.Dataset:
    """Any supported file as a `datasets.Dataset`, fully in memory, nothing left in a cache."""
    p, builder, kw = _format(path)
    with tempfile.TemporaryDirectory(prefix="pmp-datasets-", ignore_cleanup_errors=True) as tmp:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=tmp, keep_in_memory=True,
                                   **kw)
    return ds


def _column(ds: datasets.Dataset, name: str, path, what: str) -> list:
    if name not in ds.column_names:
        raise ValueError(f"{path} has no {what} column {name!r}; columns present: {', '.join(ds.column_names)}")
    return list(ds[name])


def load_text_files(paths: list[str], text_column: str = "text") -> list[str]:
    """Documents from local files, each a `Document` whose ``.source`` is the file path.

    txt/md: the whole file, cut into ~20 k-char documents at blank-line paragraph boundaries.
    jsonl/json/csv/tsv/parquet: one document per row from `text_column` (empty rows skipped).
    """
    if not paths:
        raise ValueError("no data files given")
    docs: list[str] = []
    for path in paths:
        p, builder, _ = _format(path)
        ds = read_file(p)
        if builder == "text":
            text = "\n".join(ds["text"])
            docs += [Document(c, str(p)) for c in chunk_text(text)]
        else:
            docs += [Document(t, str(p)) for t in _column(ds, text_column, p, "text") if t and str(t).strip()]
    return docs


def load_labelled_file(path: str, text_column: str = "text", label_column: str = "label") -> datasets.Dataset:
    """A labelled file -> Dataset with columns ``text`` (str) and ``label`` (a `datasets.ClassLabel`).

    The label names live in ``ds.features["label"].names``. String labels are mapped to 0..K-1 in sorted order;
    non-negative integer (or boolean) labels are kept as class ids (names '0'..'K-1'); integers with negatives
    (e.g. -1/1) are mapped in sorted order (names are their string forms). Float labels (regression) are rejected.
    """
    p, builder, _ = _format(path)
    if builder == "text":
        raise ValueError(f"{p}: a labelled file must be jsonl/json/csv/tsv/parquet, not plain text")
    ds = read_file(p)
    texts = _column(ds, text_column, p, "text")
    raw = _column(ds, label_column, p, "label")
    keep = [i for i, (t, y) in enumerate(zip(texts, raw)) if t is not None and str(t).strip() and y is not None]
    texts, raw = [str(texts[i]) for i in keep], [raw[i] for i in keep]
    if not texts:
        raise ValueError(f"{p} holds no rows with both a text and a label")
    if any(isinstance(y, float) and not float(y).is_integer() for y in raw):
        raise ValueError(f"{p}: column {label_column!r} holds non-integer numbers; only classification labels "
                         f"(strings or integers) are supported")
    if any(isinstance(y, str) for y in raw):
        values = sorted({str(y) for y in raw})
        index = {v: i for i, v in enumerate(values)}
        names, labels = values, [index[str(y)] for y in raw]
    else:
        ints = [int(y) for y in raw]
        if min(ints) >= 0:  # already class ids
            names, labels = [str(i) for i in range(max(ints) + 1)], ints
        else:
            values = sorted(set(ints))
            index = {v: i for i, v in enumerate(values)}
            names, labels = [str(v) for v in values], [index[y] for y in ints]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
