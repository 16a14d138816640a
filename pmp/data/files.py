"""User-supplied local files (txt / jsonl / json / csv / tsv / parquet), read through `datasets`.

`datasets` is run with a throwaway cache directory and ``keep_in_memory=True``: a user's corpus file is read
once per run and then lives on as cached token blocks, so converting it to Arrow under ~/.cache/huggingface
would only leave a stale copy behind.

A file `datasets` cannot read (empty, not UTF-8, malformed JSON lines or CSV, not parquet) gives one `ValueError`
that names the file and says what is wrong, never a traceback from datasets/pandas/pyarrow.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError
from pandas.errors import EmptyDataError, ParserError

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
MAX_CLASSES = 1000  # a label column with more distinct values is almost surely not a label column (ids, texts)


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
        raise FileNotFoundError(f"data file not found: {p}" + (" is a directory, not a file" if p.is_dir() else ""))
    ext = p.suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"unsupported file type {ext!r} for {p}; supported: {', '.join(sorted(FORMATS))}")
    builder, kw = FORMATS[ext]
    return p, builder, kw


def read_file(path: str | Path) -> datasets.Dataset:
    """Any supported file as a `datasets.Dataset`, fully in memory, nothing left in a cache.

    An unreadable file raises one ValueError naming it and the problem (see `_unreadable`)."""
    p, builder, kw = _format(path)
    if p.stat().st_size == 0:  # datasets would raise StopIteration (json), EmptyDataError (csv) or ArrowInvalid
        raise ValueError(f"{p} is empty")
    try:
        with (
            _datasets_errors_unlogged(),
            tempfile.TemporaryDirectory(prefix="pmp-datasets-", ignore_cleanup_errors=True) as tmp,
        ):
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=tmp,
                                       keep_in_memory=True, **kw)
    # DatasetGenerationError wraps what a builder raised (UnicodeDecodeError, pandas' ParserError/EmptyDataError,
    # pyarrow's ArrowInvalid); ValueError: the same unwrapped (json, parquet) and datasets' "no data" for a file
    # without rows.
    except (DatasetGenerationError, ValueError) as e:
        raise ValueError(_unreadable(p, builder, e)) from None
    return ds


@contextmanager
def _datasets_errors_unlogged() -> Iterator[None]:
    """datasets logs a failed read at ERROR before raising; read_file reports it once, as its own error."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreadable(p: Path, builder: str, e: BaseException) -> str:
    """One sentence naming file `p` and what is wrong with it, given the error `datasets` raised reading it."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    kind, root = p.suffix[1:].upper(), chain[-1]
    if any(isinstance(x, UnicodeDecodeError) for x in chain):
        return f"{p} {_not_utf8(p)}"
    if any(isinstance(x, EmptyDataError) for x in chain) or "corresponds to no data" in str(chain[0]):
        return f"{p} holds no rows (nothing but a header or blank lines)"
    parser_error = next((x for x in chain if isinstance(x, ParserError)), None)
    if parser_error is not None:
        detail = str(parser_error).strip().splitlines()[-1].removeprefix("Error tokenizing data. C error: ")
        return f"{p} is not well-formed {kind} ({detail}); check its quoting and separators"
    if builder == "json" and (problem := _json_problem(p)):
        return f"{p}: {problem}"
    if builder == "parquet":
        return f"{p} is not a parquet file, or it is damaged ({root})"
    if builder == "csv":
        return (f"{p} could not be read as {kind} ({root}); a column with numbers in its first rows and text further "
                f"down is a common cause")
    return f"{p} could not be read as {kind} ({type(root).__name__}: {str(root).strip()[:300]})"


def _not_utf8(p: Path) -> str:
    where = "an invalid byte sequence"
    data = p.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"byte 0x{data[e.start]:02x} on line {line}"
    return f"is not UTF-8 text ({where}); save it with UTF-8 encoding and try again"


_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", type(None): "null"}


def _json_problem(p: Path) -> str:
    """What keeps `p` from being JSON lines: its first line that is not a JSON object ('' if there is none)."""
    text = p.read_bytes().decode("utf-8", "replace")  # UTF-8 errors are reported before this is asked
    if p.suffix.lower() == ".json":
        try:
            json.loads(text)
            return ("it holds JSON that is not a table of rows (a .json file holds a list of objects, an object "
                    "of columns, or one object per line)")
        except ValueError:
            pass  # JSON lines, perhaps: look for the bad line
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 etc.
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n} is not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line"
        if not isinstance(row, dict):
            kind = _JSON_TYPES.get(type(row), "value")
            return f"line {n} is a JSON {kind}, not an object; write one JSON object per line"
    return ""


def _column(ds: datasets.Dataset, name: str, path, what: str) -> list:
    if name not in ds.column_names:
        raise ValueError(f"{path} has no {what} column {name!r}; columns present: {', '.join(ds.column_names)}")
    try:
        values = list(ds[name])
    except UnicodeDecodeError:  # pyarrow's JSON reader keeps invalid UTF-8 in its strings until they are read
        raise ValueError(f"{path} {_not_utf8(Path(path))}") from None
    nested = next((i for i, v in enumerate(values) if isinstance(v, (dict, list))), None)
    if nested is not None:
        plain = "text" if what == "text" else "labels (strings or integers)"
        raise ValueError(f"{path}: column {name!r} holds nested values (lists or objects, e.g. row {nested + 1}: "
                         f"{repr(values[nested])[:60]}), not {plain}; name a {what} column of plain values")
    return values


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
            found = [Document(c, str(p)) for c in chunk_text("\n".join(ds["text"]))]
        else:
            found = [Document(t, str(p)) for t in _column(ds, text_column, p, "text") if t and str(t).strip()]
        if not found:
            where = "" if builder == "text" else f" in column {text_column!r} (every row is empty)"
            raise ValueError(f"{p} holds no text{where}")
        docs += found
    return docs


def load_labelled_file(path: str, text_column: str = "text", label_column: str = "label") -> datasets.Dataset:
    """A labelled file -> Dataset with columns ``text`` (str) and ``label`` (a `datasets.ClassLabel`).

    The label names live in ``ds.features["label"].names``. The K distinct labels are mapped to 0..K-1 in sorted
    order, named by their string forms: string labels sorted as strings, integer (or boolean) labels as integers,
    so labels that already are 0..K-1 keep their ids and sparse ones (e.g. -1/1, 0/10**9) are renumbered. Float
    labels (regression), nested values, a single class and more than `MAX_CLASSES` classes are rejected.
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
        keys, first = [str(y) for y in raw], str(raw[0])
    else:
        keys, first = [int(y) for y in raw], raw[0] if isinstance(raw[0], int) else int(raw[0])
    values = sorted(set(keys))  # labels 0..K-1 (or strings) map to themselves, sparse integers to their rank
    if len(values) > MAX_CLASSES:
        raise ValueError(f"{p}: column {label_column!r} holds {len(values):,} distinct labels, but a task may have at "
                         f"most {MAX_CLASSES:,} classes; check that it is the label column")
    if len(values) < 2:
        raise ValueError(f"a task needs at least 2 classes; {p} has only label {first!r}")
    index = {v: i for i, v in enumerate(values)}
    names, labels = [str(v) for v in values], [index[k] for k in keys]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
