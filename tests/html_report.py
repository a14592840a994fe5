"""Read a logitsam report.html back as what it shows: section tables, figures and their captions.

A helper module, not a conftest.py (tests elsewhere import the root conftest by name). `HTMLParser().feed()`
accepts any text, so feeding it checks nothing; `read_report` returns the page's content for the tests to
compare with what they expect, and fails when an image would not load or a figure has no caption.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Figure:
    src: str
    alt: str
    caption: str = ""
    png: bytes = b""  # the image's bytes, from its data URI or its file


@dataclass
class Report:
    title: str = ""
    sections: list[str] = field(default_factory=list)  # the <h2> headings, in order
    tables: list[tuple[str, list[dict[str, str]]]] = field(default_factory=list)  # (section, rows as {header: cell})
    figures: list[Figure] = field(default_factory=list)

    def table(self, section: str) -> list[dict[str, str]]:
        """The rows of the one table under the heading ``section``."""
        found = [rows for heading, rows in self.tables if heading == section]
        assert len(found) == 1, f"{len(found)} tables under {section!r}; sections: {self.sections}"
        return found[0]

    def column(self, section: str, header: str) -> list[str]:
        return [row[header] for row in self.table(section)]


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.report = Report()
        self._text: list[str] | None = None  # collecting the text of the open h1 / h2 / th / td / figcaption
        self._header: list[str] = []
        self._rows: list[list[str]] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("title", "h2", "th", "td", "figcaption"):
            self._text = []
        elif tag == "table":
            self._header, self._rows = [], []
        elif tag == "tr" and self._rows is not None:
            self._row = []
        elif tag == "img":
            self.report.figures.append(Figure(src=attrs.get("src") or "", alt=attrs.get("alt") or ""))

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("title", "h2", "th", "td", "figcaption") and self._text is not None:
            text, self._text = " ".join("".join(self._text).split()), None
            if tag == "title":
                self.report.title = text
            elif tag == "h2":
                self.report.sections.append(text)
            elif tag == "th":
                self._header.append(text)
            elif tag == "td" and self._row is not None:
                self._row.append(text)
            elif tag == "figcaption" and self.report.figures:
                self.report.figures[-1].caption = text
        elif tag == "tr" and self._row is not None:
            if self._row:  # the header row holds <th> only
                assert len(self._row) == len(self._header), (self._header, self._row)
                self._rows.append(self._row)
            self._row = None
        elif tag == "table" and self._rows is not None:
            section = self.report.sections[-1] if self.report.sections else ""
            self.report.tables.append((section, [dict(zip(self._header, r, strict=True)) for r in self._rows]))
            self._rows = None


def image_bytes(src: str, base_dir: Path) -> bytes:
    """The PNG an <img src> loads: a base64 data URI, or a file relative to the page. Fails if it would not load."""
    if src.startswith("data:"):
        meta, _, data = src.partition(",")
        assert meta == "data:image/png;base64", f"not a base64 PNG data URI: {src[:60]!r}"
        try:
            png = base64.b64decode(data, validate=True)
        except binascii.Error as err:
            raise AssertionError(f"bad base64 in a data URI: {err}") from err
    else:
        path = base_dir / src
        assert src and path.is_file(), f"<img src={src!r}> does not resolve to a file under {base_dir}"
        png = path.read_bytes()
    assert png.startswith(PNG_MAGIC), f"<img src={src[:60]!r}> is not a PNG"
    return png


def read_report(path: str | Path) -> Report:
    """Parse a report.html; every image must load as a PNG and every figure must have a caption."""
    path = Path(path)
    reader = _Reader()
    reader.feed(path.read_text(encoding="utf-8"))
    reader.close()
    report = reader.report
    for figure in report.figures:
        figure.png = image_bytes(figure.src, path.parent)
        assert figure.caption, f"the figure {figure.alt!r} has no caption"
    return report
