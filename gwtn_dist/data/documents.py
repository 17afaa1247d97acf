"""Text documents, streamed from Wikipedia dumps, JSON-lines extracts and plain text files.

Every source yields ``(text, None)`` for a usable document or ``(None, reason)`` for one that is
skipped, so writers can count skips by reason without a second pass. Memory stays bounded by one
document (XML elements are cleared as soon as their page ends). Wikitext comes raw, because
cleaning costs more than parsing and parallel writers clean only their own share: pass each
text through ``cleaner(path)``.

- ``*.xml`` / ``*.xml.bz2``: a MediaWiki ``pages-articles`` dump; main-namespace pages that are
  not redirects, their wikitext cleaned by :func:`clean_wikitext`.
- ``*.jsonl`` / ``*.json`` (optionally ``.bz2``): one JSON object per line with a ``text`` field
  (WikiExtractor ``--json`` and most other extractors write this).
- WikiExtractor's default output: ``<doc id=… title=…>`` … ``</doc>`` blocks of plain text.
- anything else: plain UTF-8 text, one document per paragraph (a run of non-blank lines).

Extractors name their files ``wiki_00`` and the like, so a file whose name does not tell is
recognised by its first bytes (``<mediawiki``, ``{``, ``<doc``).
"""

from __future__ import annotations

import bz2
import codecs
import html
import itertools
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("gwtn")
Item = tuple[str | None, str | None]
NON_UTF8 = "non-UTF-8 text"
TRUNCATED = "truncated or malformed input"
CHUNK = 1 << 20

# The link namespaces whose targets are media or page metadata, not prose.
_DROP_LINKS = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.IGNORECASE)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_COMMENT = re.compile(r"<!--[\s\S]*?(-->|$)")
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>[\s\S]*?</ref>", re.IGNORECASE)
_DROP_BLOCKS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>[\s\S]*?</\1>", re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_MAGIC = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")


def _until_fixed(pattern: re.Pattern, repl, text: str) -> str:
    # Innermost first, repeated: that is how nested {{…{{…}}…}} and [[File:…[[link]]…]] go.
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match) -> str:
    body = match.group(1)
    if _DROP_LINKS.match(body):
        return ""
    return body.rsplit("|", 1)[-1] if "|" in body else body


def clean_wikitext(text: str) -> str:
    """Plain prose from wikitext: templates, refs, tables, files and categories removed; link
    text kept; headings and list items kept as lines; markup and HTML tags stripped."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _until_fixed(_INNER_TEMPLATE, "", text)
    text = _until_fixed(_INNER_TABLE, "", text)
    text = _until_fixed(_INNER_LINK, _link_text, text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _LIST_MARK.sub("", text)
    text = html.unescape(text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _open_binary(path: Path):
    return bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def wiki_pages(path: Path) -> Iterator[Item]:
    """Wikitext of the main-namespace articles of a pages-articles dump, streamed.

    Bytes that are not UTF-8 are decoded to U+FFFD before the XML parser sees them (the parser
    would otherwise stop at the first one); a page that contains U+FFFD is skipped as non-UTF-8.
    """
    parser = ET.XMLPullParser(events=("start", "end"))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    root = None
    try:
        with _open_binary(path) as f:
            while True:
                chunk = f.read(CHUNK)
                parser.feed(decoder.decode(chunk, final=not chunk))
                for event, elem in parser.read_events():
                    if event == "start":
                        root = elem if root is None else root
                    elif _local(elem.tag) == "page":
                        yield _page(elem)
                        root.clear()  # drop finished pages: memory stays one page
                if not chunk:
                    break
            parser.close()
    except ET.ParseError as exc:
        log.warning("%s: stopped reading at a damaged or truncated part (%s)", path, exc)
        yield None, TRUNCATED


def _page(page: ET.Element) -> Item:
    fields = {_local(child.tag): child for child in page}
    if fields.get("ns") is not None and (fields["ns"].text or "").strip() != "0":
        return None, "not an article"
    if "redirect" in fields:
        return None, "redirect"
    revision = fields.get("revision")
    node = None if revision is None else next(
        (c for c in revision if _local(c.tag) == "text"), None)
    raw = (node.text or "") if node is not None else ""
    title = fields["title"].text or "" if "title" in fields else ""
    if "\ufffd" in raw or "\ufffd" in title:
        return None, NON_UTF8
    return raw, None


def json_lines(path: Path) -> Iterator[Item]:
    """The ``text`` field of each line of a JSON-lines file."""
    with _open_binary(path) as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield None, NON_UTF8
                continue
            except json.JSONDecodeError:
                yield None, "bad JSON line"
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                yield text.strip(), None
            else:
                yield None, "no text field"


def paragraphs(path: Path) -> Iterator[Item]:
    """Paragraphs (runs of non-blank lines, joined by newlines) of a plain text file."""
    lines: list[str] = []
    bad = False
    with _open_binary(path) as f:
        for raw in itertools.chain(f, [b""]):  # b"": a final blank line ends the last one
            if raw.strip():
                try:
                    lines.append(raw.decode("utf-8").strip())
                except UnicodeDecodeError:
                    bad = True
                continue
            if bad:
                yield None, NON_UTF8
            elif lines:
                yield "\n".join(lines), None
            lines, bad = [], False


def doc_blocks(path: Path) -> Iterator[Item]:
    """The text of each ``<doc …>`` … ``</doc>`` block (WikiExtractor), without its title line."""
    lines: list[bytes] | None = None
    with _open_binary(path) as f:
        for raw in f:
            if raw.startswith(b"<doc"):
                lines = []
            elif raw.startswith(b"</doc>") and lines is not None:
                try:
                    text = b"".join(lines[1:]).decode("utf-8").strip()  # [0]: the title
                except UnicodeDecodeError:
                    yield None, NON_UTF8
                else:
                    yield (text, None) if text else (None, "empty document")
                lines = None
            elif lines is not None:
                lines.append(raw)


def kind(path: Path | str) -> str:
    """``xml``, ``jsonl``, ``doc`` or ``text``: by the name, else by the first bytes."""
    path = Path(path)
    name = path.name.lower().removesuffix(".bz2")
    if name.endswith(".xml"):
        return "xml"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    try:
        with _open_binary(path) as f:
            head = f.read(4096).lstrip()
    except (OSError, EOFError):
        return "text"  # the reader reports the damage
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"<doc"):
        return "doc"
    return "xml" if b"<mediawiki" in head else "text"


def read_documents(path: Path | str) -> Iterator[Item]:
    """The documents of one input file, by its kind (see the module docstring)."""
    readers = {"xml": wiki_pages, "jsonl": json_lines, "doc": doc_blocks, "text": paragraphs}
    return _guarded(readers[kind(path)](Path(path)), path)


def _guarded(items: Iterator[Item], path: Path | str) -> Iterator[Item]:
    # A truncated .bz2 or an unreadable file ends the file, counted, instead of the whole job.
    try:
        yield from items
    except (OSError, EOFError) as exc:
        log.warning("%s: stopped reading at a damaged or truncated part (%s)", path, exc)
        yield None, TRUNCATED


def cleaner(path: Path | str) -> Callable[[str], str]:
    """What turns a document of ``path`` into plain text: wikitext cleaning for XML dumps."""
    return clean_wikitext if kind(path) == "xml" else str.strip
