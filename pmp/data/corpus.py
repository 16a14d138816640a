"""Pre-training documents: the default registry corpus, local files or a hub dataset; and the fixed val split.

Documents carry their source (`pmp.data.files.Document`), so that both a character budget (``max_chars``) and
the validation split can spread over every book/file instead of exhausting the first one.
"""

from __future__ import annotations

import datasets

from pmp.config import DataConfig
from pmp.data.cache import cache_root, is_prepared, prepared_manifest, reading
from pmp.data.files import CHUNK_CHARS, Document, chunk_text, load_text_files
from pmp.data.prepare import prepare

MIN_CHUNK_CHARS = 1_000


def load_documents(cfg: DataConfig) -> list[str]:
    """The corpus named by ``cfg.corpus`` as a list of documents (each a `Document` str with ``.source``).

    'default': the prepared registry novels (prepared on first use), cut into ~20 k-char documents at paragraph
    boundaries. Comma-separated paths: local txt/jsonl/json/csv/tsv/parquet files. 'hub:NAME': the train split of
    a Hugging Face Hub dataset (needs network). Documents come in a fixed order that interleaves the sources
    round-robin; with ``max_chars`` > 0 they are taken in that order until the budget is spent (the last one
    truncated), so even a small budget samples several sources.
    """
    corpus = cfg.corpus.strip()
    if corpus == "default":
        docs = _default_documents(cfg.cache_dir, cfg.max_chars)
    elif corpus.startswith("hub:"):
        docs = _hub_documents(corpus[4:].strip(), cfg.text_column)
    else:
        paths = [p.strip() for p in corpus.split(",") if p.strip()]
        if not paths:
            raise ValueError("data.corpus is empty: use 'default', comma-separated files, or 'hub:NAME'")
        docs = load_text_files(paths, cfg.text_column)
    docs = take_chars(interleave(docs), cfg.max_chars)
    if not docs:
        raise ValueError(f"corpus {cfg.corpus!r} holds no text")
    n_src = len({getattr(d, "source", "") for d in docs})
    print(f"corpus {cfg.corpus!r}: {len(docs):,} documents, {sum(map(len, docs)):,} chars from {n_src} source(s)")
    return docs


def _default_documents(cache_dir: str, max_chars: int) -> list[str]:
    if not is_prepared(cache_dir):
        print(f"pmp data: default corpus not prepared in {cache_root(cache_dir)}; running prepare (one-time, "
              f"~40 MB download)")
        prepare(cache_dir)
    with reading(cache_dir):
        root, books = cache_root(cache_dir), prepared_manifest(cache_dir)["corpus"]
        texts = {book: (root / books[book]["path"]).read_text("utf-8") for book in sorted(books)}
    target = CHUNK_CHARS
    if max_chars > 0:  # small budgets: smaller documents, so every book still gives >= 2 (a val split per book)
        target = max(MIN_CHUNK_CHARS, min(CHUNK_CHARS, max_chars // (2 * len(books))))
    return [Document(c, book) for book, text in texts.items() for c in chunk_text(text, target)]


def _hub_documents(name: str, text_column: str) -> list[str]:
    if not name:
        raise ValueError("data.corpus 'hub:NAME' needs a dataset name after 'hub:'")
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 -- offline, unknown name, gated: all end here
        raise RuntimeError(f"could not load hub dataset {name!r} (this needs network access to the Hugging Face "
                           f"Hub; offline, use 'default' or local files): {type(e).__name__}: {e}") from None
    if text_column not in ds.column_names:
        raise ValueError(f"hub dataset {name!r} has no column {text_column!r}; columns present: "
                         f"{', '.join(ds.column_names)} (set data.text_column)")
    return [Document(t, name) for t in list(ds[text_column]) if t and t.strip()]


def interleave(docs: list[str]) -> list[str]:
    """Round-robin across sources (in order of first appearance), each source's documents in order."""
    groups: dict[str, list[str]] = {}
    for d in docs:
        groups.setdefault(getattr(d, "source", ""), []).append(d)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def take_chars(docs: list[str], max_chars: int) -> list[str]:
    """Documents in order until `max_chars` are spent, the last one truncated (0 = all)."""
    if max_chars <= 0:
        return list(docs)
    out, left = [], max_chars
    for d in docs:
        if left <= 0:
            break
        out.append(d if len(d) <= left else Document(d[:left], getattr(d, "source", "")))
        left -= len(d)
    return out


def split_documents(docs: list[str], val_fraction: float,
                    sources: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Fixed (seed-free) document-level split -> (train, val).

    Per source (``sources``, else each document's ``.source``): k = round(val_fraction * n) (half up) evenly spaced
    documents go to val; a source where k == 0 instead gives val the tail of its last document, cut at a line
    break, about val_fraction of the source's characters. So every source is represented in val, val is
    nonempty for any nonempty corpus, and a single document is split by characters.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if sources is None:
        sources = [getattr(d, "source", "") for d in docs]
    if len(sources) != len(docs):
        raise ValueError(f"got {len(sources)} sources for {len(docs)} documents")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        groups.setdefault(s, []).append(i)
    to_val: set[int] = set()
    cut: dict[int, int] = {}  # document index -> char position where its val tail starts
    for idx in groups.values():
        n = len(idx)
        k = min(int(val_fraction * n + 0.5), n - 1)
        if k >= 1:
            to_val |= {idx[min(n - 1, int((j + 0.5) * n / k))] for j in range(k)}
            continue
        last = idx[-1]
        doc = docs[last]
        val_chars = max(1, round(val_fraction * sum(len(docs[i]) for i in idx)))
        if len(doc) < 2:  # too short to cut: the whole document, if the source keeps another for train
            if n >= 2:
                to_val.add(last)
            continue
        pos = max(1, len(doc) - min(val_chars, len(doc) - 1))
        nl = doc.find("\n", pos)
        if 0 < nl < len(doc) - 1:
            pos = nl + 1
        cut[last] = pos
    train, val = [], []
    for i, d in enumerate(docs):
        src = sources[i]
        if i in to_val:
            val.append(d)
        elif i in cut:
            train.append(Document(d[:cut[i]], src))
            val.append(Document(d[cut[i]:], src))
        else:
            train.append(d)
    return train, val
