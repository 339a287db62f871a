"""Model output to safe HTML: markdown-it (js-default) -> Pygments -> nh3 allow-list.

Model output is untrusted. Raw HTML in it is escaped by markdown-it (`html` is off in js-default),
and whatever HTML we generate passes an allow-list that keeps no scripts, no event handlers, no
`hx-*` attributes, no styles and only http/https/mailto links. Images are never fetched: they
become links, so a reply cannot make the browser call another origin.

While a reply streams, `StreamRenderer` splits it into finished top-level blocks, each rendered
once, and the one unfinished block at the end (the tail), re-rendered on every update.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import nh3
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

ALLOWED_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code",
    "pre", "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
    "span", "div", "sup", "sub",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "ol": {"start"},
    "code": {"class"},
    "span": {"class"},
    "div": {"class"},
    "pre": {"class"},
}
URL_SCHEMES = {"http", "https", "mailto"}
_FORMATTER = HtmlFormatter(nowrap=True, classprefix="hl-")


def _highlight(code: str, lang: str, _attrs: str) -> str:
    """Pygments-highlight a fenced block with a known language; otherwise let markdown-it escape."""
    name = (lang or "").strip().split()[0] if lang else ""
    if not name:
        return ""
    try:
        lexer = get_lexer_by_name(name, stripall=False)
    except ClassNotFound:
        return ""
    return highlight(code, lexer, _FORMATTER)


def _image_as_link(self, tokens, idx, options, env) -> str:
    """Render `![alt](src)` as a plain link, so no image is ever loaded from another origin."""
    token = tokens[idx]
    src = token.attrGet("src") or ""
    alt = self.renderInlineAsText(token.children or [], options, env) or src
    return f'<a href="{html.escape(src)}">{html.escape("Image: " + alt)}</a>'


def _make_md(highlighter=_highlight) -> MarkdownIt:
    md = MarkdownIt("js-default", {"highlight": highlighter})
    md.add_render_rule("image", _image_as_link)
    return md


_MD = _make_md()
# The unfinished tail is re-rendered on every update: it skips Pygments (the costliest step),
# and its code is highlighted once, when the block is finished.
_MD_TAIL = _make_md(None)


def sanitize(fragment: str) -> str:
    """Apply the allow-list to generated HTML."""
    return nh3.clean(
        fragment,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


# Bump whenever `render` would write different HTML for the same text (markdown options, the
# highlighter, the sanitizer's allow-list): replies cached by an older version are re-rendered.
RENDER_VERSION = 1


def render(text: str) -> str:
    """Render a whole markdown document from the model to safe HTML."""
    if not text:
        return ""
    return sanitize(_MD.render(text))


@dataclass
class StreamRenderer:
    """Incremental renderer: finished blocks are rendered once; only the tail is re-rendered."""

    source: str = ""
    committed: int = 0  # characters of `source` already emitted as finished blocks
    blocks: list[str] = field(default_factory=list)

    _cr: bool = False  # the last delta ended in "\r": a "\n" starting the next one belongs to it

    def feed(self, delta: str) -> None:
        """Append model text (line breaks normalised to \n, even when split across deltas)."""
        if self._cr and delta.startswith("\n"):
            delta = delta[1:]
        self._cr = delta.endswith("\r")
        self.source += delta.replace("\r\n", "\n").replace("\r", "\n")

    def update(self, *, final: bool = False) -> tuple[list[str], str]:
        """Return (newly finished blocks' HTML, tail HTML) for everything fed so far."""
        pending = self.source[self.committed :]
        if not pending:
            return [], ""
        if final:
            self.committed = len(self.source)
            done = render(pending)
            new = [done] if done else []
            self.blocks.extend(new)
            return new, ""
        # One parse per update: the tokens say where the last block starts and are rendered
        # directly, finished part and tail alike.
        tokens = _MD.parse(pending)
        split_line, split = _last_block_start(pending, tokens)
        new: list[str] = []
        if split > 0:
            k = next(
                i
                for i, t in enumerate(tokens)
                if t.level == 0 and t.nesting >= 0 and t.map and t.map[0] >= split_line
            )
            done = sanitize(_MD.renderer.render(tokens[:k], _MD.options, {}))
            if done:
                new.append(done)
                self.blocks.append(done)
            self.committed += split
            tokens = tokens[k:]
        tail = sanitize(_MD_TAIL.renderer.render(tokens, _MD_TAIL.options, {})) if tokens else ""
        return new, tail


# A last block that is only a number or a bullet may be the start of the next list item
# ("2" arrives before "."), which would continue the list above it: not a new block yet.
_MAYBE_ITEM = re.compile(r"\s*(\d{1,9}[.)]?|[-*+])\s*")


def _last_block_start(text: str, tokens: list | None = None) -> tuple[int, int]:
    """(line, offset) where the last top-level block of `text` starts; (0, 0) if only one."""
    tokens = _MD.parse(text) if tokens is None else tokens
    starts = [t.map[0] for t in tokens if t.level == 0 and t.nesting >= 0 and t.map]
    lines = text.split("\n")
    if len(starts) >= 2 and _MAYBE_ITEM.fullmatch("\n".join(lines[starts[-1] :])):
        starts.pop()
    if len(starts) < 2:
        return 0, 0
    line = starts[-1]
    return line, sum(len(part) + 1 for part in lines[:line])
