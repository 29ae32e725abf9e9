"""Plain text from a MediaWiki XML dump: the conversion behind the Wikipedia asset.

`wiki_xml_to_text` keeps the real articles (namespace 0, no redirects) and strips their markup
(templates, refs, tables, files, categories, comments) down to prose, with `= Title =` and
`== Section ==` lines. Used by `barber.fetch`; needs the optional `mwparserfromhell` package
(extra "assets"), imported only when a page is stripped.
"""

from __future__ import annotations

import re
from typing import Iterator

#: Link prefixes (namespaces) whose links are dropped entirely rather than kept as text.
DROP_LINK_NAMESPACES = {"file", "image", "media", "category"}


def _local(tag: str) -> str:
    """An XML tag without its `{namespace}`."""
    return tag.rsplit("}", 1)[-1]


def iter_wiki_pages(stream) -> Iterator[tuple[str, str, bool, str]]:
    """Yield `(title, ns, is_redirect, wikitext)` for each <page> of a MediaWiki XML dump."""
    import xml.etree.ElementTree as ET

    for _event, elem in ET.iterparse(stream, events=("end",)):
        if _local(elem.tag) != "page":
            continue
        title, ns, redirect, text = "", "0", False, ""
        for child in elem.iter():
            tag = _local(child.tag)
            if tag == "title":
                title = child.text or ""
            elif tag == "ns":
                ns = (child.text or "0").strip()
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = child.text or ""
        yield title, ns, redirect, text
        elem.clear()


def is_article(title: str, ns: str, redirect: bool, text: str) -> bool:
    """True for a real article: namespace 0, not a redirect, no `Namespace:` title, not empty."""
    if ns != "0" or redirect or not text.strip():
        return False
    if re.match(r"\s*#redirect", text, re.IGNORECASE):
        return False
    return not re.match(
        r"^(Wikipedia|WP|Help|Template|Category|File|Image|Portal|Talk|User|MediaWiki|Module|Draft):", title
    )


def _drop_link(title: str) -> bool:
    """True for links that are not prose: files, images, categories, interlanguage links."""
    m = re.match(r"\s*:?\s*([^:\]]+?)\s*:", title)
    if not m:
        return False
    prefix = m.group(1)
    return prefix.lower() in DROP_LINK_NAMESPACES or bool(re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*|simple", prefix))


def strip_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: no refs, tables, templates, files, categories, comments;
    headings as `== Section ==` lines; links replaced by their text."""
    import mwparserfromhell as mw
    from mwparserfromhell.nodes import Comment, Heading, Tag, Template, Text, Wikilink

    code = mw.parse(text)
    for node in code.filter(recursive=False, forcetype=(Template, Comment)):
        _remove(code, node)
    for node in code.filter(forcetype=(Template, Comment)):
        _remove(code, node)
    for node in code.filter(forcetype=Tag):
        if str(node.tag).lower() in {"ref", "table", "gallery", "math", "references", "timeline", "imagemap"}:
            _remove(code, node)
    for node in code.filter(forcetype=Wikilink):
        if _drop_link(str(node.title)):
            _remove(code, node)
    for node in code.filter(forcetype=Heading):  # recursive: an unclosed tag can swallow the rest
        title = " ".join(node.title.strip_code().split())
        bar = "=" * node.level
        try:
            code.replace(node, Text(f"\n{bar} {title} {bar}\n" if title else "\n"))
        except ValueError:
            pass
    plain = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    return _tidy(plain)


def _remove(code, node) -> None:
    """Remove `node` from `code` if it is still there (a parent may already be gone)."""
    try:
        code.remove(node)
    except ValueError:
        pass


def _tidy(text: str) -> str:
    """Normalise whitespace and drop markup leftovers the parser could not place."""
    text = re.sub(r"<[^>\n]{0,200}>", "", text)  # stray html tags
    text = re.sub(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}", "", text)  # unbalanced markup
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes left in odd places
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t]+", " ", line).strip()
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list / indent markers
        if line.startswith("|") or line.startswith("!"):  # table rows outside a parsed table
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_xml_to_text(stream) -> tuple[str, int]:
    """Plain text of all real articles of a MediaWiki XML dump (`= Title =` then the body, blank
    lines between articles); returns `(text, number_of_articles)`."""
    articles = []
    for title, ns, redirect, text in iter_wiki_pages(stream):
        if not is_article(title, ns, redirect, text):
            continue
        body = strip_wikitext(text)
        if body:
            articles.append(f"= {title.strip()} =\n\n{body}")
    return "\n\n".join(articles) + "\n", len(articles)
