"""An HTML page checked with the standard library's parser: it parses, and it makes no network reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Found:
    figures: list[str] = field(default_factory=list)  # ids of <figure> elements
    images: list[str] = field(default_factory=list)  # src of <img>
    links: list[str] = field(default_factory=list)  # every src/href/action/data attribute value
    pre_text: str = ""
    text: str = ""
    tags: list[str] = field(default_factory=list)


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found = Found()
        self.in_pre = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.found.tags.append(tag)
        if tag == "figure" and a.get("id"):
            self.found.figures.append(a["id"])
        if tag == "img":
            self.found.images.append(a.get("src") or "")
        if tag == "pre":
            self.in_pre += 1
        for k, v in attrs:
            if k in ("src", "href", "action", "data", "srcset", "poster") and v is not None:
                self.found.links.append(v)

    def handle_endtag(self, tag):
        if tag == "pre":
            self.in_pre -= 1

    def handle_data(self, data):
        self.found.text += data
        if self.in_pre:
            self.found.pre_text += data


def check_page(text: str) -> Found:
    """Parse the page; assert it is a whole document without any network reference; return what it holds."""
    p = _Parser()
    p.feed(text)
    p.close()
    f = p.found
    assert f.tags[:1] == ["html"] and "body" in f.tags
    low = text.lower()
    assert "http://" not in low and "https://" not in low, "a network URL in the page"
    assert "@import" not in low and "url(" not in low, "a style that loads something"
    for link in f.links:
        assert link.startswith(("data:", "#")), f"a reference out of the page: {link[:80]}"
    for src in f.images:
        assert src.startswith("data:image/png;base64,") and len(src) > 200
    return f
