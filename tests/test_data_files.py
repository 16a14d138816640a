"""User files through `datasets`, document chunking, character budget and the fixed document-level split."""

import json

import datasets
import pandas as pd
import pytest

from pmp.config import DataConfig
from pmp.data.corpus import interleave, load_documents, split_documents, take_chars
from pmp.data.files import Document, chunk_text, load_labelled_file, load_text_files


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Never touch the user's real caches (pmp's or the datasets one)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PMP_CACHE", str(tmp_path / "default-pmp-cache"))


def _paras(n, words=30, tag="p"):
    return "\n\n".join(" ".join(f"{tag}{i}w{j}" for j in range(words)) for i in range(n))


def test_chunk_text():
    text = _paras(200)
    chunks = chunk_text(text, 2000)
    assert len(chunks) > 5 and all(len(c) >= 2000 for c in chunks[:-1]) and all(len(c) < 4000 for c in chunks)
    assert "\n\n".join(chunks) == text  # cuts only at paragraph boundaries
    one_line = "x" * 10_000  # no paragraph or line breaks: cut by characters
    assert "".join(chunk_text(one_line, 1000)) == one_line
    assert chunk_text("short", 1000) == ["short"]
    assert chunk_text("", 1000) == []


def test_load_text_files_all_formats(tmp_path):
    (tmp_path / "a.txt").write_text(_paras(2000, tag="a"))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(3)))
    pd.DataFrame({"body": ["c0", "", "c2"]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"body": ["d0"]}).to_parquet(tmp_path / "d.parquet")
    paths = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.csv", "d.parquet")]
    docs = load_text_files(paths, text_column="body")
    a = [d for d in docs if d.source.endswith("a.txt")]
    assert len(a) > 1 and "\n\n".join(a) == (tmp_path / "a.txt").read_text().strip("\n")
    assert [str(d) for d in docs if not d.source.endswith("a.txt")] == ["row 0", "row 1", "row 2", "c0", "c2", "d0"]
    assert all(isinstance(d, Document) and isinstance(d, str) for d in docs)
    assert not (tmp_path / "hf").exists()  # nothing written to the datasets cache


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_files([str(tmp_path / "missing.txt")])
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(ValueError, match=r"supported: .*\.csv.*\.jsonl.*\.parquet.*\.txt"):
        load_text_files([str(tmp_path / "x.docx")])
    (tmp_path / "r.jsonl").write_text(json.dumps({"content": "a", "y": 1}) + "\n")
    with pytest.raises(ValueError, match=r"'text'.*columns present: content, y"):
        load_text_files([str(tmp_path / "r.jsonl")])
    with pytest.raises(ValueError, match=r"label column 'label'.*content, y"):
        load_labelled_file(str(tmp_path / "r.jsonl"), text_column="content")
    with pytest.raises(FileNotFoundError, match="gone.csv"):
        load_labelled_file(str(tmp_path / "gone.csv"))
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i / 3}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match="non-integer"):
        load_labelled_file(str(tmp_path / "f.jsonl"))


def test_load_labelled_file_label_mapping(tmp_path):
    rows = [("good film", "pos"), ("bad film", "neg"), ("meh", "neutral"), ("", "pos")]
    (tmp_path / "s.csv").write_text("review,sent\n" + "".join(f"{t},{y}\n" for t, y in rows))
    ds = load_labelled_file(str(tmp_path / "s.csv"), text_column="review", label_column="sent")
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].names == ["neg", "neutral", "pos"]  # sorted
    assert ds["text"] == ["good film", "bad film", "meh"] and ds["label"] == [2, 0, 1]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(6)))
    ds = load_labelled_file(str(tmp_path / "i.jsonl"))
    assert ds["label"] == [0, 1, 2, 0, 1, 2] and ds.features["label"].names == ["0", "1", "2"]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": [-1, 1][i % 2]}) + "\n"
                                              for i in range(4)))
    ds = load_labelled_file(str(tmp_path / "n.jsonl"))
    assert ds["label"] == [0, 1, 0, 1] and ds.features["label"].names == ["-1", "1"]


def _docs(sources):
    return [Document(f"{s} doc {i}\n" + _paras(3, 5, tag=f"{s}{i}"), s) for s, n in sources.items() for i in range(n)]


def test_split_documents_fixed_and_every_source_in_val():
    docs = _docs({"big": 100, "mid": 20, "small": 3})
    train, val = split_documents(docs, 0.05)
    assert (train, val) == split_documents(list(docs), 0.05)  # no seed, fixed
    assert {d.source for d in val} == {"big", "mid", "small"}
    assert sum(d.source == "big" for d in val) == 5 and sum(d.source == "mid" for d in val) == 1
    # 'small' (round(0.05 * 3) == 0): the tail of its last document, the head stays in train
    head = [d for d in train if d.source == "small"][-1]
    tail = [d for d in val if d.source == "small"][0]
    assert head + tail == docs[-1] and len(head) > 0 and len(tail) > 0
    whole_val = [d for d in val if d.source != "small"]
    assert not set(whole_val) & set(train)
    assert sum(map(len, train)) + sum(map(len, val)) == sum(map(len, docs))


def test_split_documents_small_cases():
    train, val = split_documents(["line one\nline two\nline three\n" * 20], 0.1)  # one document: by characters
    assert len(train) == len(val) == 1 and train[0] + val[0] == "line one\nline two\nline three\n" * 20
    assert val[0].startswith("line")  # cut at a line break
    train, val = split_documents(["first doc", "second doc"], 0.02)  # two plain docs: val is nonempty
    assert val and train and "".join(train + val) != ""
    train, val = split_documents(["a", "b", "c", "d"], 0.25, sources=["x", "x", "y", "y"])
    assert len(val) == 2 and len(train) == 2
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(["a", "b"], 0.0)


def test_interleave_and_budget():
    docs = _docs({"a": 3, "b": 1, "c": 2})
    order = [d.source for d in interleave(docs)]
    assert order == ["a", "b", "c", "a", "c", "a"]
    budget = sum(len(d) for d in interleave(docs)[:3]) + 5
    taken = take_chars(interleave(docs), budget)
    assert len(taken) == 4 and len(taken[-1]) == 5 and sum(map(len, taken)) == budget
    assert taken[-1].source == "a"
    assert take_chars(docs, 0) == docs


def test_load_documents_local_files(tmp_path):
    (tmp_path / "one.txt").write_text(_paras(3000, tag="one"))
    (tmp_path / "two.txt").write_text(_paras(3000, tag="two"))
    cfg = DataConfig(corpus=f"{tmp_path / 'one.txt'}, {tmp_path / 'two.txt'}", max_chars=50_000)
    docs = load_documents(cfg)
    assert sum(map(len, docs)) == 50_000
    assert {d.source for d in docs} == {str(tmp_path / "one.txt"), str(tmp_path / "two.txt")}
    assert docs == load_documents(cfg)
    train, val = split_documents(docs, 0.1)
    assert {d.source for d in val} == {d.source for d in docs}
    with pytest.raises(FileNotFoundError):
        load_documents(DataConfig(corpus=str(tmp_path / "none.txt")))
    with pytest.raises(ValueError, match="empty"):
        load_documents(DataConfig(corpus=" , "))


def test_hub_corpus_errors_and_rows(monkeypatch):
    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"hub dataset 'someone/books'.*network"):
        load_documents(DataConfig(corpus="hub:someone/books"))
    ds = datasets.Dataset.from_dict({"content": ["first row", "", "second row"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)
    with pytest.raises(ValueError, match=r"no column 'text'.*content"):
        load_documents(DataConfig(corpus="hub:someone/books"))
    docs = load_documents(DataConfig(corpus="hub:someone/books", text_column="content"))
    assert docs == ["first row", "second row"] and docs[0].source == "someone/books"
