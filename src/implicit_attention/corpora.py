"""Plain English text for language-model pre-training, read from locally installed packages.

Three sources, each read from files that an ordinary package manager installs (nothing is
fetched from the web by this module):

``fortunes``
    The Debian ``fortunes`` and ``fortunes-min`` cookie files in ``/usr/share/games/fortunes/``
    (quotations, jokes, definitions, poems). One passage per cookie; the ``off/`` (offensive)
    directory is skipped, as are cookies that are mostly not letters (ASCII art).
``jane_austen``
    The six completed novels of Jane Austen from the Debian package ``r-cran-janeaustenr``
    (``/usr/lib/R/site-library/janeaustenr/``), stored there as character vectors (one
    element per line of the Project Gutenberg text) in R's lazy-load database
    (``data/Rdata.rdb`` / ``.rdx``). The database is decoded by a small reader of R's XDR
    serialisation format in this module, so neither R nor any Python package is needed. One
    passage per paragraph (lines joined, blank lines separate paragraphs); title pages,
    chapter/volume headings, the closing "THE END"/"FINIS" and an editor's note after it are
    dropped; the Gutenberg ``_italics_`` underscores are removed.
``wikipedia``
    The shortened English Wikipedia articles (206 pages of a 2016 dump: 106 articles and 100
    redirects) that gensim ships as test data,
    ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
    read straight from the gensim *wheel* (a zip file) without installing gensim. The wiki
    markup is removed by :func:`wikitext_paragraphs`; one passage per prose paragraph (lists,
    tables, headings, references and the trailing "See also"/"References"/... sections dropped).

Measured on Debian (``fortunes`` 1:1.99.1-7.3, ``r-cran-janeaustenr`` 1.0.0, gensim 4.4.0),
with words counted as whitespace-separated tokens of the cleaned passages:

===============  ========  =========
source           passages  words
===============  ========  =========
fortunes           15,179    441,111
jane_austen         9,986    717,093
wikipedia           4,702    389,453
total              29,867  1,547,657
===============  ========  =========

(The Wikipedia file has 206 pages, of which 106 are articles rather than redirects; their raw
markup has 711k whitespace tokens, of which about 320k are references, templates, tables,
lists, links to files and the trailing reference sections.) Split into sentences by
:func:`sentences`: 77,966 sentences, median 16 words.

:func:`build_english_corpus` writes all passages to one gzip-compressed JSON-lines file
(``{"source": ..., "text": ...}`` per line; ``scripts/build_corpus.py`` builds
``out/corpus/english.jsonl.gz``, 3.4 MB) and :func:`read_english_corpus` reads it back.
:func:`sentences` is the simple, deterministic sentence splitter used by the ground-truth
task (:mod:`implicit_attention.benchmark.groundtruth`).
"""

from __future__ import annotations

import bz2
import gzip
import html
import importlib.util
import io
import json
import lzma
import re
import struct
import xml.etree.ElementTree as ElementTree
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AUSTEN_ROOT",
    "ENGLISH_SOURCES",
    "FORTUNES_ROOT",
    "GENSIM_VERSION",
    "GENSIM_WIKI_MEMBER",
    "EnglishSource",
    "build_english_corpus",
    "find_gensim_wheel",
    "load_fortunes",
    "load_jane_austen",
    "load_wikipedia_sample",
    "read_english_corpus",
    "read_r_lazyload",
    "sentences",
    "split_sentences",
    "wikitext_paragraphs",
]

#: Where Debian's ``fortunes`` / ``fortunes-min`` packages put the cookie files.
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
#: Where Debian's ``r-cran-janeaustenr`` package installs the R package.
AUSTEN_ROOT = Path("/usr/lib/R/site-library/janeaustenr")
#: The gensim release whose wheel holds the Wikipedia sample (any 4.x wheel has the same file).
GENSIM_VERSION = "4.4.0"
#: The Wikipedia sample's path inside the gensim wheel (or an installed gensim package).
GENSIM_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

#: The six novels, in publication order, as named in the ``janeaustenr`` data base.
_AUSTEN_NOVELS: tuple[str, ...] = (
    "sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")

_FORTUNES_HINT = (
    "The fortune cookie files were not found in {root}. They come with the Debian/Ubuntu packages "
    "'fortunes' and 'fortunes-min'; install them with:\n\n    sudo apt-get install fortunes fortunes-min\n"
)
_AUSTEN_HINT = (
    "The Jane Austen novels were not found in {root} (expected data/Rdata.rdb and data/Rdata.rdx). They "
    "come with the Debian/Ubuntu package 'r-cran-janeaustenr'; install it with:\n\n"
    "    sudo apt-get install r-cran-janeaustenr\n"
)
_WIKI_HINT = (
    "The Wikipedia sample is read from gensim's test data, inside the gensim wheel, without installing "
    "gensim. {problem} Download the wheel (about 28 MB) and pass its path (or its directory):\n\n"
    "    python -m pip download --no-deps gensim==" + GENSIM_VERSION + " -d DIR\n\n"
    "(scripts/build_corpus.py does this by itself when --gensim-wheel is not given.)"
)


@dataclass(frozen=True)
class EnglishSource:
    """Description of one source of :data:`ENGLISH_SOURCES`.

    Attributes:
        name: the ``source`` field of the corpus records.
        description: what the text is.
        install: the command that installs the files the loader reads.
        licence: licence and provenance of the text.
    """

    name: str
    description: str
    install: str
    licence: str


#: The sources of the English corpus, by name, in the order :func:`build_english_corpus` writes them.
ENGLISH_SOURCES: dict[str, EnglishSource] = {source.name: source for source in (
    EnglishSource(
        "fortunes",
        "BSD fortune cookies (quotations, jokes, definitions, short poems), one passage per cookie",
        "sudo apt-get install fortunes fortunes-min",
        "Debian packages 'fortunes'/'fortunes-min' (fortune-mod 1.99.1): the BSD fortune collection, "
        "Copyright (c) 1991 The Regents of the University of California, BSD licence; quotations of "
        "various origin (see /usr/share/doc/fortunes/copyright)",
    ),
    EnglishSource(
        "jane_austen",
        "Jane Austen's six completed novels, one passage per paragraph",
        "sudo apt-get install r-cran-janeaustenr",
        "Project Gutenberg texts (public domain), packaged by Julia Silge in the CRAN package "
        "'janeaustenr' 1.0.0 (MIT licence)",
    ),
    EnglishSource(
        "wikipedia",
        "106 shortened English Wikipedia articles (2016 dump, markup removed), one passage per paragraph",
        f"python -m pip download --no-deps gensim=={GENSIM_VERSION} -d DIR  (the wheel is read, not installed)",
        "English Wikipedia, CC BY-SA 3.0 (authors: Wikipedia contributors), from gensim's test data "
        "(gensim is LGPL-2.1)",
    ),
)}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

_BACKSPACE_PAIR = re.compile(r"[^\x08]\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _normalise(text: str) -> str:
    """Collapse whitespace runs to single spaces and strip."""
    return " ".join(text.split())


def _letter_fraction(text: str) -> float:
    """Fraction of the non-space characters of ``text`` that are letters."""
    visible = [char for char in text if not char.isspace()]
    return sum(char.isalpha() for char in visible) / len(visible) if visible else 0.0


def _remove_overstrike(text: str) -> str:
    """Resolve terminal over-striking (``"_\\bx"`` underlining) to the struck character.

    Each backspace deletes the character before it (repeatedly, so ``"__\\b\\bab"`` -> ``"ab"``);
    backspaces with nothing to delete are dropped.
    """
    while True:
        stripped = _BACKSPACE_PAIR.sub("", text)
        if stripped == text:
            return text.replace("\x08", "")
        text = stripped


# --------------------------------------------------------------------------------------------
# Fortunes
# --------------------------------------------------------------------------------------------


def _fortune_files(root: Path) -> list[Path]:
    """The cookie files of ``root`` (no extension, so not ``.dat``/``.u8``; not in ``off/``), sorted;
    a file reached twice through symbolic links is read once."""
    files: dict[Path, Path] = {}
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.suffix:
            files.setdefault(path.resolve(), path)
    return list(files.values())


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_fortunes(root: str | Path | None = None, *, min_letter_fraction: float = 0.6) -> list[str]:
    """Load the fortune cookies as passages.

    Every file of ``root`` (default :data:`FORTUNES_ROOT`) without an extension is read
    (UTF-8, as Debian ships them, or latin-1 for a file that is not valid UTF-8; the ``.dat``
    index files and ``.u8`` links are skipped and sub-directories such as ``off/`` are not
    entered), split into cookies at lines consisting of ``%`` only; over-striking (``"_\\bx"``)
    is resolved, other control characters (bells) are removed and whitespace is collapsed.
    Cookies in which fewer than ``min_letter_fraction`` of the non-space characters are letters
    (ASCII art, tables of symbols) are dropped. Files are read in sorted order, cookies in file
    order; duplicates are kept.

    Raises:
        FileNotFoundError: if ``root`` holds no cookie files; the message gives the install command.
    """
    root = Path(FORTUNES_ROOT if root is None else root)
    files = _fortune_files(root) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(_FORTUNES_HINT.format(root=root))
    passages: list[str] = []
    for path in files:
        text = _decode(path.read_bytes()).replace("\r\n", "\n")
        for cookie in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE):
            passage = _normalise(_CONTROL.sub("", _remove_overstrike(cookie)))
            if passage and _letter_fraction(passage) >= min_letter_fraction:
                passages.append(passage)
    return passages


# --------------------------------------------------------------------------------------------
# R lazy-load data bases (janeaustenr)
# --------------------------------------------------------------------------------------------

# SEXP type codes of R's serialisation format (src/main/serialize.c).
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _DOTSXP = 9, 10, 13, 14, 15, 16, 17
_VECSXP, _EXPRSXP, _RAWSXP, _S4SXP = 19, 20, 24, 25
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP = 255, 254, 253, 252, 251
_BASENAMESPACE_SXP, _NAMESPACESXP, _PACKAGESXP, _PERSISTSXP = 250, 249, 248, 247
_EMPTYENV_SXP, _BASEENV_SXP, _ATTRLANGSXP, _ATTRLISTSXP = 242, 241, 240, 239
_SPECIAL_VALUES = {
    _NILVALUE_SXP: None, _GLOBALENV_SXP: "<globalenv>", _UNBOUNDVALUE_SXP: "<unbound>",
    _MISSINGARG_SXP: "<missing>", _BASENAMESPACE_SXP: "<base namespace>", _EMPTYENV_SXP: "<emptyenv>",
    _BASEENV_SXP: "<baseenv>",
}
_NA_INTEGER = -(2**31)


@dataclass
class _RObject:
    """A decoded R object that is not a plain vector: pairlists, environments, language objects."""

    kind: str
    value: Any
    attributes: dict[str, Any]


class _XdrReader:
    """Decoder of R's XDR (big-endian binary) serialisation, for the object types data bases use.

    Vectors become Python lists (``NA`` -> ``None``); attributes are dropped from vectors except
    ``names``, which turns a generic vector (``list``) into a ``dict``. Pairlists become dicts
    keyed by tag. Closures, byte code and external pointers are not supported (``ValueError``).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ValueError("truncated R serialisation")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        length = self._int()
        if length == -1:  # long vector: two 32-bit halves
            upper, lower = self._int(), self._int()
            length = (upper << 32) + (lower & 0xFFFFFFFF)
        return length

    def read_header(self) -> None:
        if self._take(2) != b"X\n":
            raise ValueError("not an XDR (binary, format 'X') R serialisation")
        version = self._int()
        self._int()  # version of R that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialisation version {version}")

    def _attributes(self, flags: int) -> dict[str, Any]:
        if not flags & (1 << 9):
            return {}
        attributes = self.read_item()
        return attributes.value if isinstance(attributes, _RObject) else {}

    def _string(self, flags: int) -> str | None:
        length = self._int()
        if length == -1:
            return None
        raw = self._take(length)
        levels = flags >> 12
        return raw.decode("latin-1") if levels & 4 and not levels & 8 else raw.decode("utf-8", errors="replace")

    def read_item(self) -> Any:
        flags = self._int()
        sexp_type = flags & 0xFF
        has_tag = bool(flags & (1 << 10))
        if sexp_type in _SPECIAL_VALUES:
            return _SPECIAL_VALUES[sexp_type]
        if sexp_type == _REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if sexp_type in (_PERSISTSXP, _NAMESPACESXP, _PACKAGESXP):
            self._int()  # always 0
            names = [self.read_item() for _ in range(self._int())]
            value = _RObject("namespace", names, {})
            self.refs.append(value)
            return value
        if sexp_type == _SYMSXP:
            symbol = self.read_item()
            self.refs.append(symbol)
            return symbol
        if sexp_type == _ENVSXP:
            env = _RObject("environment", None, {})
            self.refs.append(env)
            self._int()  # locked
            enclosure, frame, hashtab = self.read_item(), self.read_item(), self.read_item()
            env.value = {"enclosure": enclosure, "frame": frame, "hashtab": hashtab}
            env.attributes = self._attributes(1 << 9)
            return env
        if sexp_type in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP, _ATTRLANGSXP, _ATTRLISTSXP):
            return self._pairlist(flags, sexp_type, has_tag)
        if sexp_type == _CHARSXP:
            return self._string(flags)
        if sexp_type in (_LGLSXP, _INTSXP):
            length = self._length()
            values = struct.unpack(f">{length}i", self._take(4 * length))
            result: Any = [None if v == _NA_INTEGER else (bool(v) if sexp_type == _LGLSXP else v) for v in values]
        elif sexp_type == _REALSXP:
            length = self._length()
            result = list(struct.unpack(f">{length}d", self._take(8 * length)))
        elif sexp_type == _CPLXSXP:
            length = self._length()
            parts = struct.unpack(f">{2 * length}d", self._take(16 * length))
            result = [complex(parts[2 * i], parts[2 * i + 1]) for i in range(length)]
        elif sexp_type == _RAWSXP:
            result = self._take(self._length())
        elif sexp_type == _STRSXP:
            result = [self.read_item() for _ in range(self._length())]
        elif sexp_type in (_VECSXP, _EXPRSXP):
            result = [self.read_item() for _ in range(self._length())]
        elif sexp_type == _S4SXP:
            return _RObject("S4", None, self._attributes(flags))
        else:
            raise ValueError(f"unsupported R object type {sexp_type} in serialisation")
        attributes = self._attributes(flags)
        names = attributes.get("names")
        if sexp_type == _VECSXP and isinstance(names, list) and len(names) == len(result):
            return dict(zip(names, result))
        return result

    def _pairlist(self, flags: int, sexp_type: int, has_tag: bool) -> _RObject:
        items: dict[str, Any] = {}
        position = 0
        while True:
            attributes = self._attributes(flags)
            tag = self.read_item() if has_tag else None
            items[tag if isinstance(tag, str) else str(position)] = self.read_item()
            position += 1
            if sexp_type not in (_LISTSXP, _ATTRLISTSXP):
                items["__cdr__"] = self.read_item()
                return _RObject("language", items, attributes)
            flags = self._int()  # the cdr: another cons cell, or the end of the list
            sexp_type, has_tag = flags & 0xFF, bool(flags & (1 << 10))
            if sexp_type == _NILVALUE_SXP:
                return _RObject("pairlist", items, {})
            if sexp_type not in (_LISTSXP, _ATTRLISTSXP):
                self.pos -= 4
                items["__cdr__"] = self.read_item()
                return _RObject("pairlist", items, {})


def _unserialize(data: bytes) -> Any:
    reader = _XdrReader(data)
    reader.read_header()
    return reader.read_item()


def _decompress_entry(blob: bytes, compression: int) -> bytes:
    """Decompress one object of an ``.rdb`` file (R's ``lazyLoadDBinsertValue`` layout)."""
    if compression in (2, 3):  # 4-byte length, 1-byte method, payload
        method, payload = blob[4:5], blob[5:]
        if method == b"Z":
            return zlib.decompress(payload)
        if method == b"2":
            return bz2.decompress(payload)
        if method == b"X":
            return lzma.decompress(payload)
        if method == b"0":
            return payload
        raise ValueError(f"unknown compression method {method!r} in R lazy-load data base")
    return zlib.decompress(blob[4:])  # 4-byte big-endian length, zlib stream


def read_r_lazyload(base: str | Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load data base (``base + ".rdx"`` and ``base + ".rdb"``).

    The ``.rdx`` index is a (gzip-compressed) serialised list whose ``variables`` element maps
    each variable name to its ``(offset, length)`` in the ``.rdb`` file; each ``.rdb`` entry is
    a compressed serialised R object (``compressed`` element: 1 zlib, 2 bzip2, 3 xz). Character
    vectors come back as lists of ``str`` (``NA`` -> ``None``); see :class:`_XdrReader`.
    """
    base = Path(base)
    index_bytes = base.with_suffix(".rdx").read_bytes()
    if index_bytes[:2] == b"\x1f\x8b":
        index_bytes = gzip.decompress(index_bytes)
    else:  # older data bases: 4-byte length + zlib stream, as in .rdb entries
        index_bytes = zlib.decompress(index_bytes[4:])
    index = _unserialize(index_bytes)
    compressed = index.get("compressed", [True])
    compression = int(compressed[0]) if isinstance(compressed, list) and compressed else 1
    data = base.with_suffix(".rdb").read_bytes()
    values: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        blob = data[int(offset):int(offset) + int(length)]
        values[name] = _unserialize(_decompress_entry(blob, compression))
    return values


_AUSTEN_HEADING = re.compile(r"^(?:chapter|volume)\s+(?:[0-9]+|[ivxlc]+)\.?(?:\s.*)?$", re.IGNORECASE)
_AUSTEN_END = re.compile(r"^(?:the end|finis|a note on the text)$", re.IGNORECASE)


def _austen_paragraphs(lines: Sequence[str | None]) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            current.append(line)
            continue
        if current:
            paragraphs.append(_normalise(" ".join(current).replace("_", " ")))
            current = []
    return paragraphs


def load_jane_austen(root: str | Path | None = None) -> list[str]:
    """Load the six completed novels of Jane Austen as paragraphs.

    Reads ``data/Rdata.rdb``/``.rdx`` of the installed R package ``janeaustenr`` (``root``,
    default :data:`AUSTEN_ROOT`) with
    :func:`read_r_lazyload` (neither R nor any Python package is needed). The lines of each
    novel are joined into paragraphs (blank lines separate paragraphs), the Project Gutenberg
    ``_italics_`` underscores are removed and whitespace is collapsed. Only the text of the novel is
    kept: the title-page lines before the first chapter/volume heading, the headings themselves,
    the closing "THE END"/"FINIS" and anything after it (an editor's note), and paragraphs that are
    mostly not letters (``***``) are dropped. Novels in publication order, paragraphs in text order.

    Raises:
        FileNotFoundError: if the package's data base is missing; the message gives the install command.
    """
    root = Path(AUSTEN_ROOT if root is None else root)
    base = root / "data" / "Rdata"
    if not (base.with_suffix(".rdb").is_file() and base.with_suffix(".rdx").is_file()):
        raise FileNotFoundError(_AUSTEN_HINT.format(root=root))
    novels = read_r_lazyload(base)
    passages: list[str] = []
    for name in _AUSTEN_NOVELS:
        paragraphs = _austen_paragraphs(novels[name])
        first = next((i for i, text in enumerate(paragraphs) if _AUSTEN_HEADING.match(text)), 0)
        end = next((i for i, text in enumerate(paragraphs) if _AUSTEN_END.match(text)), len(paragraphs))
        passages.extend(text for text in paragraphs[first:end]
                        if not _AUSTEN_HEADING.match(text) and _letter_fraction(text) >= 0.5)
    return passages


# --------------------------------------------------------------------------------------------
# Wikipedia sample (gensim test data)
# --------------------------------------------------------------------------------------------

_WIKI_END_SECTIONS = frozenset({
    "see also", "references", "notes", "external links", "further reading", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "works cited", "references and notes",
})
_WIKI_DROPPED_NAMESPACES = re.compile(
    r"^\s*:?\s*(?:file|image|category|media|wikipedia|wp|template|help|portal|wikt|wiktionary|commons|"
    r"s|q|b|n|v|special|[a-z]{2,3}(?:-[a-z]+)?|simple)\s*:", re.IGNORECASE)
_WIKI_BLOCK_TAGS = re.compile(
    r"<(ref|math|gallery|timeline|syntaxhighlight|source|pre|code|score|imagemap|chem|hiero|graph)\b[^>]*?"
    r"(?:/>|>.*?</\1\s*>)", re.IGNORECASE | re.DOTALL)
_WIKI_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/>", re.IGNORECASE)
_WIKI_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_WIKI_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_WIKI_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_WIKI_BARE_URL = re.compile(r"https?://\S+")
_WIKI_EMPTY_BRACKETS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
_WIKI_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?)])")
_WIKI_SPACE_AFTER_OPENING = re.compile(r"\(\s*(?:[,;:]\s*)*")
_WIKI_INLINE_TEMPLATE = re.compile(r"\{\{\s*([^{}|]+?)\s*\|([^{}]*)\}\}")
_WIKI_FORMATNUM = re.compile(r"\{\{\s*formatnum:\s*([^{}|]+?)\s*\}\}", re.IGNORECASE)
_WIKI_RANGE_WORDS = frozenset({"-", "\u2013", "to", "and", "or", "by", "x", "&", "+"})
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def _remove_balanced(text: str, opening: str, closing: str) -> str:
    """Remove every (possibly nested) ``opening ... closing`` block from ``text``.

    An unclosed block runs to the end of the text; a stray ``closing`` outside any block is kept.
    """
    out: list[str] = []
    depth = 0
    kept_from = 0
    for match in re.finditer(f"{re.escape(opening)}|{re.escape(closing)}", text):
        if match.group() == opening:
            if depth == 0:
                out.append(text[kept_from:match.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                kept_from = match.end()
    if depth == 0:
        out.append(text[kept_from:])
    return "".join(out)


def _expand_inline_template(match: re.Match[str]) -> str:
    """Text of the few inline templates whose content is part of the sentence; others are kept."""
    name = match.group(1).strip().lower()
    arguments = [part.strip() for part in match.group(2).split("|")]
    positional = [part for part in arguments if "=" not in part]
    if name in ("convert", "cvt") and positional:
        shown = [positional[0]]
        rest = positional[1:]
        while len(rest) >= 2 and rest[0].lower() in _WIKI_RANGE_WORDS:
            shown += rest[:2]
            rest = rest[2:]
        if rest:
            shown.append(rest[0])
        return " ".join(shown)
    if name in ("lang", "transl") and len(positional) >= 2:
        return positional[-1]
    if name in ("nowrap", "nobr", "small", "em", "smallcaps", "sic") and positional:
        return positional[0]
    if name in ("c.", "circa") and positional:
        return "c. " + positional[0]
    return match.group(0)


def _replace_internal_links(text: str) -> str:
    """Resolve ``[[target|label]]`` to ``label`` (``[[target]]`` to ``target``), innermost first;
    links into other namespaces (files, categories, other languages) are removed with their captions."""
    pattern = re.compile(r"\[\[((?:(?!\[\[)(?!\]\]).)*)\]\]", re.DOTALL)

    def replace(match: re.Match[str]) -> str:
        inner = match.group(1)
        if _WIKI_DROPPED_NAMESPACES.match(inner):
            return ""
        target, _, label = inner.partition("|")
        shown = label.rpartition("|")[2] if label else target
        return shown.split("#", 1)[0] if not label else shown

    for _ in range(10):  # nesting depth of links within image captions is small
        text, count = pattern.subn(replace, text)
        if not count:
            break
    return text.replace("[[", "").replace("]]", "")


def wikitext_paragraphs(markup: str, *, min_words: int = 8) -> list[str]:
    """The prose paragraphs of one article's MediaWiki markup, as plain text.

    Removes comments, ``<ref>``/``<math>``/... blocks, templates ``{{...}}`` (except that
    ``{{convert|...}}``, ``{{lang|...}}``, ``{{nowrap|...}}``, ``{{formatnum:...}}`` and ``{{c.|...}}`` keep their text) and tables
    ``{|...|}`` (nested), file/category/interlanguage links; keeps the shown text of internal
    and external links; drops bold/italic quotes, other HTML tags and HTML entities. Then keeps
    the lines that are neither headings nor list, indentation or table lines, stops at the
    first "See also"/"References"/"Notes"/... heading, and returns the paragraphs of at least
    ``min_words`` words that end like a sentence (``.``, ``!`` or ``?``, possibly followed by a
    closing quote or bracket), whitespace collapsed.
    """
    text = _WIKI_COMMENT.sub("", markup)
    text = _WIKI_SELF_CLOSING_REF.sub("", text)
    text = _WIKI_BLOCK_TAGS.sub("", text)
    text = _WIKI_FORMATNUM.sub(r"\1", text)
    text = _WIKI_INLINE_TEMPLATE.sub(_expand_inline_template, text)
    text = _remove_balanced(text, "{{", "}}")
    text = _remove_balanced(text, "{|", "|}")
    text = _replace_internal_links(text)
    text = _WIKI_EXTERNAL_LINK.sub(lambda match: match.group(1) or "", text)
    text = _WIKI_BARE_URL.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    text = _WIKI_TAG.sub("", text)
    text = html.unescape(text)
    paragraphs: list[str] = []
    for line in text.split("\n"):
        stripped = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", stripped)
        if heading:
            if heading.group(2).lower() in _WIKI_END_SECTIONS:
                break
            continue
        if not stripped or stripped[0] in "*#:;|!{}=_":
            continue
        paragraph = _normalise(stripped)
        paragraph = _WIKI_EMPTY_BRACKETS.sub("", paragraph)
        paragraph = _WIKI_SPACE_AFTER_OPENING.sub("(", paragraph)
        paragraph = _normalise(_WIKI_SPACE_BEFORE_PUNCTUATION.sub(r"\1", paragraph))
        if len(paragraph.split()) >= min_words and _SENTENCE_END.search(paragraph) and _letter_fraction(
                paragraph) >= 0.7:
            paragraphs.append(paragraph)
    return paragraphs


def find_gensim_wheel(directory: str | Path) -> Path | None:
    """The newest-named ``gensim-*.whl`` in ``directory``, or ``None``."""
    wheels = sorted(Path(directory).glob("gensim-*.whl"))
    return wheels[-1] if wheels else None


def _wiki_bytes(wheel: str | Path | None) -> bytes:
    """The compressed Wikipedia sample, from a wheel (file or directory) or an installed gensim."""
    if wheel is None:
        spec = importlib.util.find_spec("gensim")
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(location).parent / GENSIM_WIKI_MEMBER
            if path.is_file():
                return path.read_bytes()
        raise FileNotFoundError(_WIKI_HINT.format(problem="No wheel was given and gensim is not installed."))
    path = Path(wheel)
    if path.is_dir():
        found = find_gensim_wheel(path)
        if found is None:
            raise FileNotFoundError(_WIKI_HINT.format(problem=f"No gensim-*.whl file is in {path}."))
        path = found
    if not path.is_file():
        raise FileNotFoundError(_WIKI_HINT.format(problem=f"The wheel {path} does not exist."))
    with zipfile.ZipFile(path) as archive:
        try:
            return archive.read(GENSIM_WIKI_MEMBER)
        except KeyError:
            raise FileNotFoundError(_WIKI_HINT.format(
                problem=f"The wheel {path} lacks {GENSIM_WIKI_MEMBER}.")) from None


def load_wikipedia_sample(wheel: str | Path | None = None) -> list[str]:
    """Load the prose paragraphs of the 106 Wikipedia articles in gensim's test data (206 pages).

    Args:
        wheel: a gensim wheel file, or a directory holding one (``gensim-*.whl``); the sample is
            read from the zip without installing anything. ``None`` reads it from an installed
            gensim package instead.

    Main-namespace articles that are not redirects are kept, in dump order; each article's
    markup is turned into paragraphs by :func:`wikitext_paragraphs`.

    Raises:
        FileNotFoundError: if no wheel (or installed gensim) with the sample is found; the
            message gives the ``pip download`` command.
    """
    stream = io.BytesIO(bz2.decompress(_wiki_bytes(wheel)))
    passages: list[str] = []
    for _, element in ElementTree.iterparse(stream, events=("end",)):
        if element.tag.rpartition("}")[2] != "page":
            continue
        fields = {child.tag.rpartition("}")[2]: child for child in element}
        namespace = fields.get("ns")
        revision = fields.get("revision")
        text_element = None
        if revision is not None:
            text_element = next((c for c in revision if c.tag.rpartition("}")[2] == "text"), None)
        if (namespace is not None and (namespace.text or "").strip() == "0" and "redirect" not in fields
                and text_element is not None and text_element.text):
            passages.extend(wikitext_paragraphs(text_element.text))
        element.clear()
    return passages


# --------------------------------------------------------------------------------------------
# The corpus file
# --------------------------------------------------------------------------------------------


def build_english_corpus(path: str | Path, *, sources: Iterable[str] = tuple(ENGLISH_SOURCES),
                         wheel_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the passages of ``sources`` to ``path`` as gzip-compressed JSON lines.

    Each line is ``{"source": name, "text": passage}``; sources in the given order, passages
    in loader order. The gzip header carries no time stamp, so the file is byte-identical
    when rebuilt from the same inputs. Parent directories are created.

    Args:
        path: the output file (conventionally ``out/corpus/english.jsonl.gz``).
        sources: names of :data:`ENGLISH_SOURCES` to include.
        wheel_dir: a gensim wheel, or a directory holding one, for the ``wikipedia`` source
            (``None``: an installed gensim).

    Returns:
        ``{"path": str, "sources": {name: {"passages": n, "words": n}}, "passages": n, "words": n}``
        with words counted as whitespace-separated tokens.

    Raises:
        ValueError: for an unknown source name.
        FileNotFoundError: if a source is not installed (nothing is written then).
    """
    names = list(sources)
    unknown = [name for name in names if name not in ENGLISH_SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known: {', '.join(ENGLISH_SOURCES)}")
    loaders = {
        "fortunes": load_fortunes,
        "jane_austen": load_jane_austen,
        "wikipedia": lambda: load_wikipedia_sample(wheel_dir),
    }
    loaded = {name: loaders[name]() for name in names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed:
        for name, passages in loaded.items():
            for passage in passages:
                line = json.dumps({"source": name, "text": passage}, ensure_ascii=False) + "\n"
                compressed.write(line.encode("utf-8"))
            counts[name] = {"passages": len(passages), "words": sum(len(p.split()) for p in passages)}
    return {
        "path": str(path),
        "sources": counts,
        "passages": sum(c["passages"] for c in counts.values()),
        "words": sum(c["words"] for c in counts.values()),
    }


def read_english_corpus(path: str | Path) -> list[dict[str, str]]:
    """Read a corpus written by :func:`build_english_corpus`: a list of ``{"source", "text"}`` dicts.

    Raises:
        FileNotFoundError: if ``path`` does not exist; the message says how to build it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"The English corpus {path} does not exist. Build it once with:\n\n    python scripts/build_corpus.py\n")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------

#: Words after whose final period a sentence does not end.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "rev", "col", "gen", "capt", "lt", "sgt", "gov",
    "sen", "rep", "hon", "messrs", "mme", "mlle", "no", "vs", "etc", "e.g", "i.e", "cf", "al", "approx",
    "ca", "c", "fig", "vol", "p", "pp", "ed", "eds", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr",
    "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "a.d", "b.c",
})
_BOUNDARY = re.compile(r"([.!?])([\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Split one passage into sentences.

    A sentence ends at ``.``, ``!`` or ``?`` (optionally followed by closing quotes or
    brackets) followed by whitespace and a capital letter, optionally preceded by an opening
    quote or bracket. A period does not end a sentence after a common abbreviation (``Mr.``,
    ``Mrs.``, ``Dr.``, ``St.``, ``e.g.``, month names, ...) or a single capital letter (an
    initial, ``J. R. R. Tolkien``). Sentences are whitespace-normalised; empty ones are dropped.
    """
    text = _normalise(text)
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.group(1) == ".":
            word = text[start:match.start(1)].rsplit(" ", 1)[-1].lstrip("\"'(\u201c\u2018[")
            if word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper()):
                continue
        pieces.append(text[start:match.end(2)])
        start = match.end()
    pieces.append(text[start:])
    return [piece.strip() for piece in pieces if piece.strip()]


def sentences(passages: Iterable[str]) -> list[str]:
    """All sentences of ``passages`` (see :func:`split_sentences`), in order."""
    return [sentence for passage in passages for sentence in split_sentences(passage)]
