"""The English corpus: loaders on the real sources (skipped where not installed), the R data-base
reader, the wiki-markup cleaner, the corpus file and the sentence splitter."""

from __future__ import annotations

import bz2
import gzip
import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from implicit_attention import corpora
from implicit_attention.corpora import (
    build_english_corpus,
    load_fortunes,
    load_jane_austen,
    load_wikipedia_sample,
    read_english_corpus,
    read_r_lazyload,
    sentences,
    split_sentences,
    wikitext_paragraphs,
)

#: Where a downloaded gensim wheel (or a directory holding one) can be named for the Wikipedia test.
GENSIM_WHEEL = os.environ.get("IMPLICIT_ATTENTION_GENSIM_WHEEL")


def _fortunes_installed() -> bool:
    return corpora.FORTUNES_ROOT.is_dir() and bool(corpora._fortune_files(corpora.FORTUNES_ROOT))


def _austen_installed() -> bool:
    return (corpora.AUSTEN_ROOT / "data" / "Rdata.rdb").is_file()


def _check_passages(passages: list[str]) -> None:
    assert passages and all(isinstance(p, str) and p for p in passages)
    assert all(p == " ".join(p.split()) for p in passages), "passages are whitespace-normalised"


# --------------------------------------------------------------------------------------------
# Real sources (skipped where not installed)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not _fortunes_installed(),
                    reason="Debian 'fortunes'/'fortunes-min' not installed (apt-get install fortunes fortunes-min)")
def test_load_fortunes_real():
    passages = load_fortunes()
    _check_passages(passages)
    assert len(passages) > 10_000 and sum(len(p.split()) for p in passages) > 400_000
    assert not any("\x08" in p or "\x07" in p for p in passages)


@pytest.mark.skipif(not _austen_installed(),
                    reason="Debian 'r-cran-janeaustenr' not installed (apt-get install r-cran-janeaustenr)")
def test_load_jane_austen_real():
    passages = load_jane_austen()
    _check_passages(passages)
    assert passages[0].startswith("The family of Dashwood had long been settled in Sussex.")
    assert any(p.startswith("It is a truth universally acknowledged") for p in passages)
    assert 700_000 < sum(len(p.split()) for p in passages) < 730_000
    assert not any(p.upper().startswith(("CHAPTER ", "VOLUME ")) or p in ("THE END", "FINIS") for p in passages)
    assert not any("_" in p for p in passages)


@pytest.mark.skipif(GENSIM_WHEEL is None,
                    reason="set IMPLICIT_ATTENTION_GENSIM_WHEEL to a gensim wheel (or its directory), from "
                           "`python -m pip download --no-deps gensim==4.4.0 -d DIR`")
def test_load_wikipedia_sample_real():
    passages = load_wikipedia_sample(GENSIM_WHEEL)
    _check_passages(passages)
    assert passages[0].startswith("Anarchism is a political philosophy")
    assert sum(len(p.split()) for p in passages) > 350_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "&nbsp;", "'''"):
        assert not any(markup in p for p in passages), markup


# --------------------------------------------------------------------------------------------
# Missing sources
# --------------------------------------------------------------------------------------------


def test_missing_sources_raise_with_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes fortunes-min"):
        load_fortunes(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="apt-get install r-cran-janeaustenr"):
        load_jane_austen(tmp_path)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps gensim=="):
        load_wikipedia_sample(tmp_path)  # a directory without a wheel
    with pytest.raises(FileNotFoundError, match="pip download --no-deps gensim=="):
        load_wikipedia_sample(tmp_path / "gensim-0.0-py3-none-any.whl")


def test_corpus_sources_are_described():
    assert list(corpora.ENGLISH_SOURCES) == ["fortunes", "jane_austen", "wikipedia"]
    for name, source in corpora.ENGLISH_SOURCES.items():
        assert source.name == name and source.install and source.licence and source.description


# --------------------------------------------------------------------------------------------
# Fortunes on a hand-made directory; the corpus file
# --------------------------------------------------------------------------------------------


def _fake_fortunes(root: Path) -> Path:
    root.mkdir()
    (root / "wisdom").write_text("A stitch in time\n  saves nine.\n%\nLook before you leap.\n%\n", encoding="utf-8")
    (root / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (root / "wisdom.u8").symlink_to("wisdom")
    (root / "art").write_bytes(b"  /\\_/\\\n ( o.o )\n  > ^ <\n%\n_\x08_\x08_\x08Bold\x07 words here.\n%\n")
    (root / "off").mkdir()
    (root / "off" / "rude").write_text("Never read.\n%\n", encoding="utf-8")
    (root / "latin").write_bytes("Caf\xe9 au lait.\n".encode("latin-1"))
    return root


def test_load_fortunes_on_hand_made_files(tmp_path):
    passages = load_fortunes(_fake_fortunes(tmp_path / "fortunes"))
    # sorted files: art, latin, wisdom; ASCII art dropped; overstrike and bell removed; off/ not read
    assert passages == ["Bold words here.", "Caf\xe9 au lait.", "A stitch in time saves nine.",
                        "Look before you leap."]


def test_build_and_read_english_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "FORTUNES_ROOT", _fake_fortunes(tmp_path / "fortunes"))
    path = tmp_path / "corpus" / "english.jsonl.gz"
    counts = build_english_corpus(path, sources=["fortunes"])
    assert counts["sources"] == {"fortunes": {"passages": 4, "words": 16}}
    assert counts["passages"] == 4 and counts["words"] == 16 and counts["path"] == str(path)
    records = read_english_corpus(path)
    assert records[0] == {"source": "fortunes", "text": "Bold words here."} and len(records) == 4
    first = path.read_bytes()
    build_english_corpus(path, sources=["fortunes"])
    assert path.read_bytes() == first, "rebuilding gives the identical file"
    with pytest.raises(ValueError, match="unknown corpus source"):
        build_english_corpus(path, sources=["fortunes", "poems"])
    with pytest.raises(FileNotFoundError, match="build_corpus.py"):
        read_english_corpus(tmp_path / "missing.jsonl.gz")


# --------------------------------------------------------------------------------------------
# R lazy-load data base, on a hand-built one
# --------------------------------------------------------------------------------------------


def _r_int(value: int) -> bytes:
    return struct.pack(">i", value)


def _r_charsxp(text: str | None) -> bytes:
    if text is None:
        return _r_int(9) + _r_int(-1)
    raw = text.encode("utf-8")
    return _r_int(9 | (8 << 12)) + _r_int(len(raw)) + raw  # CHARSXP flagged UTF-8


def _r_strsxp(values: list[str | None], names: list[str] | None = None) -> bytes:
    flags = 16 | (1 << 9 if names else 0)
    body = _r_int(flags) + _r_int(len(values)) + b"".join(_r_charsxp(v) for v in values)
    return body + (_r_names(names) if names else b"")


def _r_names(names: list[str]) -> bytes:
    # attribute pairlist: LISTSXP with tag (symbol "names") and value, then NILVALUE
    symbol = _r_int(1) + _r_charsxp("names")
    return _r_int(2 | (1 << 10)) + symbol + _r_strsxp(names) + _r_int(254)


def _r_vecsxp(items: list[bytes], names: list[str]) -> bytes:
    return _r_int(19 | (1 << 9)) + _r_int(len(items)) + b"".join(items) + _r_names(names)


def _r_intsxp(values: list[int]) -> bytes:
    return _r_int(13) + _r_int(len(values)) + b"".join(_r_int(v) for v in values)


def _r_serialize(body: bytes) -> bytes:
    return b"X\n" + _r_int(3) + _r_int(0x040201) + _r_int(0x030500) + _r_int(5) + b"UTF-8" + body


def test_read_r_lazyload_on_a_hand_built_data_base(tmp_path):
    novel = _r_serialize(_r_strsxp(["EMMA", "", "Chapter 1", "", "Emma Woodhouse, handsome,", "clever.", None]))
    entry = struct.pack(">I", len(novel)) + zlib.compress(novel)
    index = _r_serialize(_r_vecsxp(
        [_r_vecsxp([_r_intsxp([0, len(entry)])], ["emma"]), _r_vecsxp([], []), _r_int(10) + _r_int(1) + _r_int(1)],
        ["variables", "references", "compressed"]))
    (tmp_path / "Rdata.rdb").write_bytes(entry)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    values = read_r_lazyload(tmp_path / "Rdata")
    assert values == {"emma": ["EMMA", "", "Chapter 1", "", "Emma Woodhouse, handsome,", "clever.", None]}
    assert corpora._austen_paragraphs(values["emma"]) == ["EMMA", "Chapter 1", "Emma Woodhouse, handsome, clever."]


# --------------------------------------------------------------------------------------------
# Wiki markup
# --------------------------------------------------------------------------------------------


def test_wikitext_paragraphs():
    markup = """{{Infobox country|name=Nowhere|capital=[[Town]]}}
'''Nowhere''' is a [[country|small country]] in the [[Atlantic Ocean]].<ref name="a">Some {{cite|x}} source.</ref> \
Its highest point is {{convert|3003|m|ft}} high, according to [http://example.org the survey].<!-- hidden --> \
It has about {{formatnum: 1200}} people.
[[File:Map.png|thumb|A map of [[Nowhere]].]]
* a list item that is long enough to count as a paragraph, but is a list.
{| class="wikitable"
| cell || cell with many words in it to be long enough.
|}
== History ==
The country was founded in 1900 by settlers from {{lang|fr|la France}} and stayed small ever since.
Too short.
A long line without a final full stop that should therefore be dropped here
== See also ==
This paragraph comes after the "See also" heading and is therefore not part of the text.
"""
    assert wikitext_paragraphs(markup) == [
        "Nowhere is a small country in the Atlantic Ocean. Its highest point is 3003 m high, according to "
        "the survey. It has about 1200 people.",
        "The country was founded in 1900 by settlers from la France and stayed small ever since.",
    ]


def test_load_wikipedia_sample_from_a_hand_made_wheel(tmp_path):
    page = ("<page><title>{title}</title><ns>{ns}</ns><id>1</id>{redirect}<revision><id>2</id>"
            '<text xml:space="preserve">{text}</text></revision></page>')
    article = "'''Apples''' are [[fruit]]s that grow on trees in many countries.&lt;ref&gt;A book.&lt;/ref&gt;"
    dump = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo><sitename>W</sitename></siteinfo>'
        + page.format(title="Apple", ns=0, redirect="", text=article)
        + page.format(title="Apples", ns=0, redirect='<redirect title="Apple" />',
                      text="#REDIRECT [[Apple]] and some more words to make it long enough.")
        + page.format(title="Talk:Apple", ns=1, redirect="", text="A talk page that is long enough to be a paragraph.")
        + "</mediawiki>")
    wheel = tmp_path / "gensim-4.4.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(corpora.GENSIM_WIKI_MEMBER, bz2.compress(dump.encode("utf-8")))
    expected = ["Apples are fruits that grow on trees in many countries."]
    assert load_wikipedia_sample(wheel) == expected
    assert load_wikipedia_sample(tmp_path) == expected  # the directory holding the wheel


# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------


def test_split_sentences_on_hand_made_text():
    text = ('Mr. Darcy bowed.  "Is it true?" she asked! He said "Go." Then he left. Did J. R. R. Tolkien '
            'write it? (Bracketed sentence.) Yes, e.g. this one. It is 3.5 m long... fine. The U.S. Army came.\n'
            "'Quoted,' he said. Numbers 1. 2. stay. Mrs. Bennet was silent")
    assert split_sentences(text) == [
        "Mr. Darcy bowed.",
        '"Is it true?" she asked!',
        'He said "Go."',
        "Then he left.",
        "Did J. R. R. Tolkien write it?",
        "(Bracketed sentence.)",
        "Yes, e.g. this one.",
        "It is 3.5 m long... fine.",
        "The U.S. Army came.",
        "'Quoted,' he said.",
        "Numbers 1. 2. stay.",
        "Mrs. Bennet was silent",
    ]
    assert split_sentences("   ") == []
    assert sentences(["One. Two.", "", "Three!"]) == ["One.", "Two.", "Three!"]
