"""Model output to safe HTML: markdown-it (js-default) -> Pygments -> nh3 allow-list.

Model output is untrusted. Raw HTML in it is escaped by markdown-it (`html` is off in js-default),
and whatever HTML we generate passes an allow-list that keeps no scripts, no event handlers, no
`hx-*` attributes, no styles and only http/https/mailto links. Images are never fetched: they
become links, so a reply cannot make the browser call another origin.

Code blocks (one box with a header bar), math (MathML) and table alignment are the rules in
chat/markdown_rules.py; their HTML passes the same allow-list.

While a reply streams, `StreamRenderer` splits it into finished top-level blocks, each rendered
once, and the one unfinished block at the end (the tail), re-rendered on every update.

Rendering has a budget. markdown-it-py is pure Python, and some inputs cost seconds per hundred
kilobytes (unclosed brackets, thousands of emphasis markers, long tables, big code blocks to
highlight); bench/README.md lists the ones measured. A text longer than `MAX_RENDER_CHARS`, or
whose parse runs past its time budget, is shown as escaped plain paragraphs instead: still safe,
still readable, and never more than the budget (plus a linear escape) of one thread's time.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass, field

import nh3
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from chat.markdown_rules import (
    ALLOWED_VALUES,
    FORMATTER,
    MATHML_ATTRIBUTES,
    MATHML_TAGS,
    MAX_HIGHLIGHT_CHARS,
    highlight_live,
    install_rules,
    live_fence,
    render_deadline,
)

ALLOWED_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code",
    "pre", "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
    "span", "div", "sup", "sub", "button",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "ol": {"start"},
    "code": {"class"},
    "span": {"class"},
    "div": {"class"},
    "pre": {"class"},
    **MATHML_ATTRIBUTES,
}
URL_SCHEMES = {"http", "https", "mailto"}

# Texts longer than this are not parsed at all: shown as plain text at once.
MAX_RENDER_CHARS = 200_000
# Seconds of parsing one document may take (a stored reply, or the last block of a live one).
RENDER_BUDGET = 0.5
# A live reply's tail is re-parsed on every update, on the event loop: a tighter budget.
TAIL_BUDGET = 0.08
# Shorter texts never hit the budget for real; a pause of the whole process (GC, a busy CPU)
# must not turn them into plain text.
_MIN_BUDGETED = 2_000

_deadline = render_deadline  # shared with the highlighting and math rules


class RenderBudgetExceeded(Exception):
    """Parsing a text took longer than its budget."""


def _check_block(state, *_args) -> bool:
    if time.perf_counter() > state.env.get("deadline", float("inf")):
        raise RenderBudgetExceeded
    return False  # never matches: the next rule parses the line


def _check_inline(state, *_args) -> bool | None:
    if time.perf_counter() > state.env.get("deadline", float("inf")):
        raise RenderBudgetExceeded
    return False


def _highlight(code: str, lang: str, _attrs: str) -> str:
    """Pygments-highlight a fenced block with a known language; otherwise let markdown-it escape."""
    name = (lang or "").strip().split()[0] if lang else ""
    if not name or len(code) > MAX_HIGHLIGHT_CHARS or time.perf_counter() > _deadline.get():
        return ""  # plain (escaped) code: highlighting is the first thing a budget gives up
    try:
        lexer = get_lexer_by_name(name, stripall=False)
    except ClassNotFound:
        return ""
    return highlight(code, lexer, FORMATTER)


def _image_as_link(self, tokens, idx, options, env) -> str:
    """Render `![alt](src)` as a plain link, so no image is ever loaded from another origin."""
    token = tokens[idx]
    src = token.attrGet("src") or ""
    alt = self.renderInlineAsText(token.children or [], options, env) or src
    return f'<a href="{html.escape(src)}">{html.escape("Image: " + alt)}</a>'


def _make_md(highlighter=_highlight) -> MarkdownIt:
    md = MarkdownIt("js-default", {"highlight": highlighter})
    md.add_render_rule("image", _image_as_link)
    install_rules(md)
    # Checks that run before every block rule (per line) and every inline rule (per markup
    # character), and before each inline post-pass: where the slow inputs spend their time.
    # As a terminator too: paragraphs, tables and setext headings loop over their lines asking
    # the terminators whether the block ends, so one paragraph of 100k lines is checked per line.
    md.block.ruler.before(
        "table", "budget", _check_block, {"alt": ["paragraph", "reference", "blockquote", "list"]}
    )
    md.inline.ruler.before("text", "budget", _check_inline)
    md.inline.ruler2.before("balance_pairs", "budget", _check_inline)
    return md


_MD = _make_md()
# The unfinished tail is re-rendered on every update: its code is highlighted piece by piece
# (see `_highlight_live`), and whole once the block is finished.
_MD_TAIL = _make_md(highlight_live)


def sanitize(fragment: str) -> str:
    """Apply the allow-list to generated HTML."""
    return nh3.clean(
        fragment,
        tags=ALLOWED_TAGS | MATHML_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        tag_attribute_values=ALLOWED_VALUES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


# Bump whenever `render` would write different HTML for the same text (markdown options, the
# highlighter, the sanitizer's allow-list): replies cached by an older version are re-rendered.
RENDER_VERSION = 2


def render(text: str, *, budget: float | None = None) -> str:
    """Render a whole markdown document from the model to safe HTML, within `budget` seconds.

    Past the budget (or `MAX_RENDER_CHARS`), the text is shown as escaped plain paragraphs.
    """
    if not text:
        return ""
    if len(text) > MAX_RENDER_CHARS:
        return plain(text)
    env = _env(text, RENDER_BUDGET if budget is None else budget)
    token = _deadline.set(env["deadline"])
    try:
        return sanitize(_MD.render(text, env))
    except (RenderBudgetExceeded, RecursionError):
        return plain(text)
    finally:
        _deadline.reset(token)


def _env(text: str, budget: float) -> dict:
    short = len(text) < _MIN_BUDGETED
    return {"deadline": float("inf") if short else time.perf_counter() + budget}


PLAIN_NOTE = "Shown as plain text: this reply is too long or too complex to format quickly."


def plain(text: str) -> str:
    """Text as escaped paragraphs under a note saying why: the fallback past the budget."""
    return f'<div class="plain"><p><em>{PLAIN_NOTE}</em></p>{paragraphs(text)}</div>'


def paragraphs(text: str) -> str:
    """Text as escaped paragraphs: blank lines split them, line breaks are kept."""
    parts = (p.strip("\n") for p in re.split(r"\n\s*\n", text))
    return "".join(
        "<p>" + html.escape(p).replace("\n", "<br>") + "</p>" for p in parts if p.strip()
    )


@dataclass
class StreamRenderer:
    """Incremental renderer: finished blocks are rendered once; only the tail is re-rendered."""

    source: str = ""
    committed: int = 0  # characters of `source` already emitted as finished blocks
    blocks: list[str] = field(default_factory=list)

    _cr: bool = False  # the last delta ended in "\r": a "\n" starting the next one belongs to it
    # Set once a parse ran past its budget: the rest of this reply is shown as plain text live
    # (it is rendered again, with the full budget, when the stored reply is shown).
    plain: bool = False

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
        if self.plain:
            return self._plain_update(pending, final)
        if final:
            self.committed = len(self.source)
            done = render(pending, budget=TAIL_BUDGET)  # on the event loop, like the tail
            new = [done] if done else []
            self.blocks.extend(new)
            return new, ""
        # One parse per update: the tokens say where the last block starts and are rendered
        # directly, finished part and tail alike.
        if len(pending) > MAX_RENDER_CHARS:
            return self._give_up(pending)
        try:
            tokens = _MD.parse(pending, _env(pending, TAIL_BUDGET))
        except (RenderBudgetExceeded, RecursionError):
            return self._give_up(pending)
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
        if len(tokens) == 1 and tokens[0].type == "fence":
            # A code block growing at the end (the common long tail): built from pieces
            # sanitized once each, rather than the whole block highlighted and cleaned again.
            return new, live_fence(tokens[0], sanitize)
        tail = sanitize(_MD_TAIL.renderer.render(tokens, _MD_TAIL.options, {})) if tokens else ""
        return new, tail

    def _give_up(self, pending: str) -> tuple[list[str], str]:
        """Too slow to parse: from here on, this reply is shown as plain text while it streams.

        One budget is spent finding out, once; every later update only escapes the new text.
        """
        self.plain = True
        note = f"<p><em>{PLAIN_NOTE}</em></p>"
        new, tail = self._plain_update(pending, final=False)
        self.blocks.insert(len(self.blocks) - len(new), note)
        return [note, *new], tail

    def _plain_update(self, pending: str, final: bool) -> tuple[list[str], str]:
        # Paragraphs before the last blank line are finished; the rest is the tail.
        if final:
            cut = len(pending)
        else:
            blank = pending.rfind("\n\n")
            cut = blank + 2 if blank >= 0 else 0
        new = []
        if cut:
            self.committed += cut
            if done := paragraphs(pending[:cut]):
                new.append(done)
                self.blocks.append(done)
        return new, paragraphs(pending[cut:])


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
