"""The pre-training novels as clean text, taken from the R packages' data files (see `BOOKS`).

Each book is checked against a minimum length, so a repackaged source that lost text fails here instead of
silently shrinking the corpus.
"""

from __future__ import annotations

from pmp.data.rdata_decode import lazyload, r_convert
from pmp.data.registry_sources import BOOKS, R_LIB
from pmp.data.text_clean import clean_text, strip_gutenberg


def extract_books(deb_files: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """{Debian package: {member path: bytes}} (the `DEBS` members) -> {book: cleaned text}, in `BOOKS` order."""
    austen, tok = (deb_files[p] for p in ("r-cran-janeaustenr", "r-cran-tokenizers"))
    tidy = r_convert(deb_files["r-cran-tidytext"][f"{R_LIB}/tidytext/extdata/books.rda"], rds=False)["books"]
    books = {}
    for book, (pkg, obj, min_chars) in BOOKS.items():
        if pkg == "r-cran-janeaustenr":
            lines = lazyload(*(austen[f"{R_LIB}/janeaustenr/data/Rdata.{e}"] for e in ("rdx", "rdb")), obj)
            text = "\n".join(str(s) for s in lines)
        elif pkg == "r-cran-tidytext":
            lines = [str(s) for s in tidy[tidy["title"] == obj]["text"].tolist()]
            if book == "twenty_thousand_leagues":  # drop the transcribers' note before the title
                lines = lines[lines.index("TWENTY THOUSAND LEAGUES UNDER THE SEA"):]
            text = "\n".join(lines)
        else:
            text = str(lazyload(*(tok[f"{R_LIB}/tokenizers/data/Rdata.{e}"] for e in ("rdx", "rdb")), obj)[0])
            text = strip_gutenberg(text)
        text = clean_text(text)
        if len(text) < min_chars:
            raise RuntimeError(f"{book} from {pkg} has {len(text):,} chars, expected >= {min_chars:,}: the source "
                               f"package changed")
        books[book] = text
    return books
