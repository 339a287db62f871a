"""The markdown-it rules the chat adds: code boxes with a header bar, math as MathML, table
alignment as classes, and the allow-list entries their HTML needs (see chat/markdown.py).

Every code block, live or stored, is one box: a header bar (language and a "Copy code" button,
whose click app.js handles by delegation, so the HTML carries no handler) above the code. Math
between dollars (`$x$`, `$$x$$`) becomes MathML on the server and passes the same sanitizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from functools import lru_cache

from latex2mathml.converter import convert as latex_to_mathml
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml, unescapeAll
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

FORMATTER = HtmlFormatter(nowrap=True, classprefix="hl-")
# When the document being rendered runs out of time (set by chat.markdown.render): past it,
# highlighting and math are given up first, and shown as their escaped source.
render_deadline: ContextVar[float] = ContextVar("render_deadline", default=float("inf"))
# A code block longer than this is shown unhighlighted: Pygments costs ~10 µs a character.
MAX_HIGHLIGHT_CHARS = 10_000
# Longer formulas are shown as their TeX source (latex2mathml is pure Python, and recursive).
MAX_MATH_CHARS = 2_000
# A live code block is highlighted in pieces of this many lines; each finished piece once.
TAIL_PIECE_LINES = 8

# MathML as latex2mathml writes it: presentation elements only. No `annotation-xml` (its
# encodings can carry HTML), no links (`href`), no styles or colours.
MATHML_TAGS = {
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msub", "msup", "msubsup",
    "mfrac", "msqrt", "mroot", "mover", "munder", "munderover", "mtable", "mtr", "mtd",
    "mstyle", "mpadded", "mphantom", "menclose", "merror", "mmultiscripts", "mprescripts",
    "none", "semantics", "annotation",
}  # fmt: skip
MATHML_ATTRIBUTES = {
    "math": {"display"},
    "mo": {"stretchy", "fence", "separator", "form", "largeop", "movablelimits", "accent",
           "lspace", "rspace", "minsize", "maxsize", "symmetric"},
    "mi": {"mathvariant"},
    "mn": {"mathvariant"},
    "mtext": {"mathvariant"},
    "mstyle": {"displaystyle", "scriptlevel", "mathvariant"},
    "mfrac": {"linethickness"},
    "mover": {"accent"},
    "munder": {"accentunder"},
    "munderover": {"accent", "accentunder"},
    "mtable": {"columnalign", "rowspacing", "columnspacing", "columnlines", "rowlines", "frame"},
    "mtr": {"columnalign"},
    "mtd": {"columnalign", "columnspan", "rowspan"},
    "mspace": {"width", "height", "depth"},
    "mpadded": {"width", "height", "depth", "lspace", "voffset"},
    "menclose": {"notation"},
    "annotation": {"encoding"},
}  # fmt: skip
# Attributes allowed with these values only: table column alignment (as classes, since styles
# are stripped) and the code header's copy button (a plain button, never a submit).
ALIGN_CLASSES = {"align-left", "align-center", "align-right"}
ALLOWED_VALUES = {
    "th": {"class": ALIGN_CLASSES},
    "td": {"class": ALIGN_CLASSES},
    "button": {"type": {"button"}, "class": {"copy-code"}},
}


@lru_cache(maxsize=64)
def _lexer(name: str):
    """A lexer per language name, made once: finding one by name costs more than a short piece."""
    try:
        return get_lexer_by_name(name, stripall=False, ensurenl=False)
    except ClassNotFound:
        return None


@lru_cache(maxsize=1024)
def _highlight_piece(code: str, name: str) -> str:
    lexer = _lexer(name)
    return highlight(code, lexer, FORMATTER) if lexer is not None else ""


def highlight_live(code: str, lang: str, _attrs: str) -> str:
    """Highlight a code block that is still growing, at a cost that does not grow with it.

    The code is cut into pieces of `TAIL_PIECE_LINES` lines, each highlighted once (cached);
    the line being written is shown plain until it ends. A construct that spans two pieces (a
    long string) may be coloured differently until the block is finished and highlighted
    whole, but the block looks like the finished one, box and colours, while it grows.
    """
    return _live_body(code, lang, _highlight_piece)


def live_fence(token, clean: Callable[[str], str]) -> str:
    """A growing fenced block (the tail of a live reply) as its box, already clean: each
    piece is highlighted and sanitized once (`clean`, cached), so an update costs the line
    being written, not the whole block again. The box, label and that line are escaped here."""
    info = unescapeAll(token.info).strip() if token.info else ""
    lang = info.split()[0] if info else ""
    body = _live_body(token.content, lang, lambda p, n: _clean_piece(p, n, clean))
    return _code_block(token.content, lang, body)


def _live_body(code: str, lang: str, piece_html) -> str:
    name = (lang or "").strip().split()[0] if lang else ""
    if not name or len(code) > MAX_HIGHLIGHT_CHARS or _lexer(name) is None:
        return ""  # escaped, like the finished block
    lines = code.splitlines(keepends=True)
    writing = lines.pop() if lines and not lines[-1].endswith("\n") else ""
    out = [
        piece_html("".join(lines[i : i + TAIL_PIECE_LINES]), name)
        for i in range(0, len(lines), TAIL_PIECE_LINES)
    ]
    return "".join(out) + escapeHtml(writing)


@lru_cache(maxsize=1024)
def _clean_piece(piece: str, name: str, clean: Callable[[str], str]) -> str:
    return clean(_highlight_piece(piece, name))


def _code_block(code: str, lang: str, highlighted: str) -> str:
    """One code box: a header with the language and a copy button, then the code."""
    label = escapeHtml(lang) if lang else "text"
    cls = f' class="language-{escapeHtml(lang)}"' if lang else ""
    body = highlighted or escapeHtml(code)
    return (
        f'<div class="code-block"><div class="code-head"><span class="code-lang">{label}</span>'
        '<button type="button" class="copy-code">Copy code</button></div>'
        f"<pre><code{cls}>{body}</code></pre></div>\n"
    )


def _fence(self, tokens, idx, options, env) -> str:
    """A fenced block as `_code_block`, highlighted when its language is known."""
    token = tokens[idx]
    info = unescapeAll(token.info).strip() if token.info else ""
    lang = info.split()[0] if info else ""
    highlighted = options.highlight(token.content, lang, "") if options.highlight and lang else ""
    return _code_block(token.content, lang, highlighted or "")


def _indented_code(self, tokens, idx, options, env) -> str:
    """An indented code block: the same box, without a language."""
    return _code_block(tokens[idx].content, "", "")


@lru_cache(maxsize=1024)
def _math(tex: str, display: bool) -> str:
    """TeX to MathML; TeX that cannot be converted is shown as its escaped source."""
    source = escapeHtml(("$$" if display else "$") + tex + ("$$" if display else "$"))
    if len(tex) > MAX_MATH_CHARS:
        return f'<code class="math-source">{source}</code>'
    try:
        return latex_to_mathml(tex, display="block" if display else "inline")
    except Exception:  # noqa: BLE001  (any TeX the converter cannot take: show the source)
        return f'<code class="math-source">{source}</code>'


def _math_renderer(tex: str, options: dict) -> str:
    display = bool(options.get("display_mode"))
    if time.perf_counter() > render_deadline.get():  # thousands of formulas: the rest as TeX
        source = escapeHtml(("$$" if display else "$") + tex + ("$$" if display else "$"))
        return f'<code class="math-source">{source}</code>'
    return _math(tex, display)


def _align_as_class(state) -> None:
    """Table alignment as a class: markdown-it writes a style attribute, which is stripped."""
    for token in state.tokens:
        if token.type in ("th_open", "td_open") and (style := token.attrGet("style")):
            token.attrs.pop("style", None)
            side = style.rsplit(":", 1)[-1].strip()
            if f"align-{side}" in ALIGN_CLASSES:
                token.attrSet("class", f"align-{side}")


def install_rules(md: MarkdownIt) -> None:
    """Add the code box, table alignment and math rules to `md`."""
    md.add_render_rule("fence", _fence)
    md.add_render_rule("code_block", _indented_code)
    md.core.ruler.push("align_as_class", _align_as_class)
    # No digits or spaces next to the dollars, so prices in prose ("$5 and $10") stay text.
    dollarmath_plugin(
        md,
        allow_labels=False,
        allow_space=False,
        allow_digits=False,
        allow_blank_lines=False,
        double_inline=True,
        renderer=_math_renderer,
    )
