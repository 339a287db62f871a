"""Model output to safe HTML, whole and while streaming."""

from __future__ import annotations

import html
import random
import re
from pathlib import Path

import pytest

from chat.markdown import StreamRenderer, render, sanitize
from tests.conftest import Node, parse_html

ROOT = Path(__file__).parent.parent


def tree(markdown: str) -> Node:
    return parse_html(render(markdown))


def tags(markdown: str) -> list[str]:
    return [n.tag for n in tree(markdown).walk()][1:]


# Formatting -------------------------------------------------------------------------------


def test_empty_text_renders_nothing():
    assert render("") == ""


def test_inline_formatting():
    doc = tree("Some **bold**, *italic*, ~~gone~~ and `code`.")
    assert doc.find("strong").text == "bold"
    assert doc.find("em").text == "italic"
    assert doc.find("s").text == "gone"
    assert doc.find("code").text == "code"


def test_block_formatting():
    doc = tree(
        "# Title\n\n## Section\n\n- one\n- two\n\n1. first\n2. second\n\n> quoted\n\n---\n\ntext"
    )
    assert doc.find("h1").text == "Title"
    assert doc.find("h2").text == "Section"
    assert [li.text for li in doc.find("ul").find_all("li")] == ["one", "two"]
    assert [li.text for li in doc.find("ol").find_all("li")] == ["first", "second"]
    assert doc.find("blockquote").text.strip() == "quoted"
    assert doc.find_all("hr")


def test_ordered_list_keeps_its_start_number():
    assert tree("3. three\n4. four").find("ol").attrs.get("start") == "3"


def test_tables():
    doc = tree("| Name | Qty |\n|---|---:|\n| apple | 3 |\n| pear | 5 |")
    assert [th.text for th in doc.find("thead").find_all("th")] == ["Name", "Qty"]
    assert [td.text for td in doc.find("tbody").find_all("td")] == ["apple", "3", "pear", "5"]


def test_safe_links_are_kept_and_marked_nofollow():
    doc = tree("[site](https://example.com/a?b=1) and [mail](mailto:a@example.com)")
    links = doc.find_all("a")
    assert [a.attrs["href"] for a in links] == ["https://example.com/a?b=1", "mailto:a@example.com"]
    for a in links:
        assert set(a.attrs["rel"].split()) >= {"noopener", "noreferrer"}


def test_plain_urls_in_angle_brackets_become_links():
    assert tree("<https://example.com>").find("a").attrs["href"] == "https://example.com"


# Code highlighting ------------------------------------------------------------------------


def test_fenced_code_with_a_known_language_is_highlighted_with_prefixed_classes():
    doc = tree("```python\ndef add(a, b):\n    return a + b  # sum\n```")
    code = doc.find("pre").find("code")
    assert "language-python" in code.attrs["class"]
    assert code.text == "def add(a, b):\n    return a + b  # sum\n"
    spans = code.find_all("span")
    assert spans, "no highlighting"
    classes = {c for s in spans for c in s.attrs["class"].split()}
    assert all(c.startswith("hl-") for c in classes), classes
    keyword = [s.text for s in spans if "hl-k" in s.attrs["class"].split()]
    assert "def" in keyword and "return" in keyword


def test_highlight_classes_have_styles():
    css = (ROOT / "static" / "pygments.css").read_text()
    doc = tree("```python\nimport os\n\ndef f(x):\n    return x + 1  # c\n```")
    classes = {c for s in doc.find("pre").find_all("span") for c in s.attrs["class"].split()}
    styled = set(re.findall(r"\.(hl-[\w-]+)", css))
    # Whitespace tokens need no style; every other class the formatter emits is styled.
    assert classes - {"hl-w"} <= styled


@pytest.mark.parametrize("fence", ["```", "```nosuchlanguage", "~~~"])
def test_code_without_a_known_language_is_escaped_not_highlighted(fence):
    doc = tree(f"{fence}\n<b onclick=x>bold?</b>\n{fence[:3]}")
    code = doc.find("pre").find("code")
    assert code.text == "<b onclick=x>bold?</b>\n"
    assert not code.find_all("b")
    assert not code.find_all("span")


def test_code_fence_info_cannot_add_attributes():
    doc = tree('```" onmouseover="alert(1)\nx\n```')
    for node in doc.walk():
        assert not any(k.startswith("on") for k in node.attrs)


# Untrusted output -------------------------------------------------------------------------


def test_images_become_links_and_are_never_loaded():
    doc = tree("Look: ![a cat](https://example.com/cat.png)")
    assert not doc.find_all("img")
    link = doc.find("a")
    assert link.attrs["href"] == "https://example.com/cat.png"
    assert "a cat" in link.text


@pytest.mark.parametrize(
    "markdown",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        "<iframe src=https://evil.example></iframe>",
        "<style>body{display:none}</style>",
        '<a href="javascript:alert(1)">x</a>',
        "text <b onmouseover=alert(1)>bold</b> <svg onload=alert(1)>",
        '<div hx-get="/c/x/delete" hx-trigger="load">x</div>',
        "<form action=https://evil.example><input name=q></form>",
    ],
)
def test_raw_html_is_shown_as_text(markdown):
    doc = tree(markdown)
    assert {n.tag for n in doc.walk()} <= {"#root", "p"}
    # The user sees the markup as text, exactly as the model wrote it.
    assert doc.text.strip() == markdown


def test_raw_html_block_is_escaped():
    out = render("<div>\n<script>alert(1)</script>\n</div>")
    assert "<script" not in out
    assert "&lt;script&gt;" in out


DANGEROUS_LINKS = [
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "&#106;avascript:alert(1)",
    "&#x6A;avascript:alert(1)",
    "javascript&colon;alert(1)",
    "\x01javascript:alert(1)",
    "vbscript:msgbox(1)",
    "VBScript:msgbox(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "data:image/svg+xml,<svg onload=alert(1)>",
    "data:image/png;base64,iVBORw0KGgo=",
    "file:///etc/passwd",
]


def unsafe_href(href: str | None) -> bool:
    """True if a browser would treat `href` as something other than http(s), mailto or a path."""
    if href is None:
        return False
    value = re.sub(r"[\x00-\x20]", "", html.unescape(href)).lower()
    scheme = re.match(r"^([a-z][a-z0-9+.-]*):", value)
    return bool(scheme) and scheme.group(1) not in {"http", "https", "mailto"}


@pytest.mark.parametrize("href", DANGEROUS_LINKS)
@pytest.mark.parametrize(
    "template",
    [
        "[click]({href})",
        "[click](<{href}>)",
        "![pic]({href})",
        "<{href}>",
        "[click][r]\n\n[r]: {href}",
        '[click]({href} "title")',
    ],
)
def test_dangerous_links_are_dropped(template, href):
    doc = tree(template.format(href=href))
    for node in doc.walk():
        for name in ("href", "src", "action", "formaction", "xlink:href"):
            assert not unsafe_href(node.attrs.get(name)), (node.tag, node.attrs)


def test_unsafe_href_helper_catches_what_it_should():
    assert unsafe_href("javascript:alert(1)")
    assert unsafe_href("JAVA\tSCRIPT:x")
    assert unsafe_href("&#106;avascript:x")
    assert not unsafe_href("https://example.com")
    assert not unsafe_href("/c/abc")


ATTACKS = "\n\n".join(
    [
        "<img src=x onerror=alert(1)>",
        '[a](https://example.com "x" onclick="alert(1)")',
        '[b](https://example.com "onmouseover=alert(1)")',
        "```python onclick=alert(1)\nprint(1)\n```",
        '<div hx-post="/send" hx-trigger="load" hx-vals=\'{"msg":"x"}\'>go</div>',
        "| <b onclick=x>a</b> |\n|---|\n| <i hx-get=/x>b</i> |",
        "> <span onmouseover=alert(1) style=color:red>q</span>",
    ]
)


def test_no_event_handler_style_or_htmx_attribute_survives():
    doc = tree(ATTACKS)
    for node in doc.walk():
        for name in node.attrs:
            assert not name.startswith("on"), (node.tag, node.attrs)
            assert not name.startswith(("hx-", "data-hx-", "sse-")), (node.tag, node.attrs)
            assert name != "style", (node.tag, node.attrs)


def test_sanitize_strips_generated_html_to_the_allow_list():
    dirty = (
        '<p onclick="x" style="color:red" hx-get="/x" data-hx-post="/y">hi</p>'
        '<a href="javascript:alert(1)" onmouseover="x">bad</a>'
        '<a href="https://ok.example" target="_top">ok</a>'
        '<script>alert(1)</script><iframe src="https://evil.example"></iframe>'
        '<img src="https://evil.example/t.png"><span class="hl-k">def</span><!-- note -->'
    )
    out = sanitize(dirty)
    doc = parse_html(out)
    assert not doc.find_all("script") and not doc.find_all("iframe") and not doc.find_all("img")
    assert "alert(1)" not in out
    assert "<!--" not in out
    assert doc.find("p").attrs == {}
    bad, ok = doc.find_all("a")
    assert "href" not in bad.attrs
    assert ok.attrs["href"] == "https://ok.example"
    assert "target" not in ok.attrs
    assert doc.find("span").attrs == {"class": "hl-k"}


# Streaming --------------------------------------------------------------------------------

DOCUMENTS = {
    "paragraphs": "First paragraph with **bold\ntext** across lines.\n\nSecond, `code`.\n\nEnd.",
    "headings": "# Title\n\nIntro.\n\n## Part one\n\nText.\n\nSetext\n======\n\n"
    "### Part *two*\nMore.",
    "lists": "Shopping:\n\n- apples\n- pears\n  - green\n  - red\n- plums\n\n"
    "1. one\n2. two\n3. three\n\nLoose:\n\n- a\n\n- b\n\n  continued\n\n- c\n\nDone.",
    "fences": "Code:\n\n```python\ndef f(x):\n\n\n    return x\n```\n\n    indented code\n\n"
    "~~~\n# not a heading\n- not a list\n~~~\n\n```\nunclosed at the end",
    "tables": "Intro\n| a | b |\n|---|:-:|\n| 1 | 2 |\n| 3 | 4 |\n\nAfter.\n\n| x |\n|---|\n| y |",
    "blockquotes": "> one\n> two\nlazy\n\n> again\n> > nested\n> - item\n\nplain\n\n> last",
    # (Loose *numbered* lists are left to test_loose_numbered_list_streamed_token_by_token.)
    "mixed": "## Steps\n\n- Install:\n\n  ```bash\n  uv sync\n  ```\n\n- Run it.\n\n"
    "> **Note:** keep `MODEL` set.\n\n***\n\n| k | v |\n|---|---|\n| a | 1 |\n\nBye!\n",
    "unsafe": "Hi <script>alert(1)</script>\n\n[x](javascript:alert(1)) ![i](https://e.x/i.png)"
    "\n\n<div hx-get=/x>y</div>",
}


def stream(doc: str, sizes: list[int]) -> tuple[list[str], list[list[str]], str]:
    """Feed `doc` in chunks of the given sizes (cycled); return all blocks, per-update blocks
    and the last tail before the final update."""
    r = StreamRenderer()
    emitted: list[list[str]] = []
    tail = ""
    i = k = 0
    while i < len(doc):
        n = sizes[k % len(sizes)]
        r.feed(doc[i : i + n])
        i, k = i + n, k + 1
        new, tail = r.update()
        emitted.append(new)
    new, final_tail = r.update(final=True)
    emitted.append(new)
    assert final_tail == ""
    return r.blocks, emitted, tail


def chunkings(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    fixed = [[1], [2], [3], [5], [8], [17], [64], [10_000]]
    return fixed + [[rng.randint(1, 12) for _ in range(25)] for _ in range(12)]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_streamed_blocks_add_up_to_the_whole_render(name):
    doc = DOCUMENTS[name]
    whole = render(doc)
    for sizes in chunkings(seed=len(doc)):
        blocks, _, _ = stream(doc, sizes)
        assert "".join(blocks) == whole, f"chunk sizes {sizes}"


@pytest.mark.parametrize("name", DOCUMENTS)
def test_finished_blocks_are_emitted_once(name):
    doc = DOCUMENTS[name]
    for sizes in ([1], [4], [1, 7, 3]):
        blocks, emitted, _ = stream(doc, sizes)
        # Every update hands out only new blocks: together they are exactly the block list.
        assert [b for new in emitted for b in new] == blocks


def test_a_block_is_emitted_when_the_next_one_starts():
    r = StreamRenderer()
    r.feed("First para")
    assert r.update() == ([], "<p>First para</p>\n")
    r.feed("graph.\n\n")
    new, tail = r.update()
    assert new == []
    r.feed("Sec")
    new, tail = r.update()
    assert new == ["<p>First paragraph.</p>\n"]
    assert tail == "<p>Sec</p>\n"
    r.feed("ond.")
    new, tail = r.update()
    assert new == []
    assert tail == "<p>Second.</p>\n"
    assert r.update(final=True) == (["<p>Second.</p>\n"], "")
    assert r.blocks == ["<p>First paragraph.</p>\n", "<p>Second.</p>\n"]


def test_an_unfinished_fence_stays_in_the_tail():
    r = StreamRenderer()
    r.feed("Intro.\n\n```python\nx = 1\n\n\ny = 2\n")
    new, tail = r.update()
    assert new == ["<p>Intro.</p>\n"]
    assert "<pre>" in tail and "y" in tail
    r.feed("```\n\nAfter.")
    new, tail = r.update()
    assert len(new) == 1 and new[0].startswith('<div class="code-block">')
    assert tail == "<p>After.</p>\n"


def test_update_without_new_text_changes_nothing():
    r = StreamRenderer()
    assert r.update() == ([], "")
    r.feed("a\n\nb")
    first = r.update()
    assert r.update() == ([], first[1])
    r.update(final=True)
    assert r.update(final=True) == ([], "")


def test_streamed_output_is_sanitized_too():
    blocks, _, tail = stream(DOCUMENTS["unsafe"], [3])
    out = "".join(blocks)
    doc = parse_html(out)
    assert not doc.find_all("script") and not doc.find_all("img")
    for node in doc.walk():
        assert not unsafe_href(node.attrs.get("href"))
        assert not any(k.startswith(("on", "hx-")) for k in node.attrs)


def test_loose_numbered_list_streamed_token_by_token():
    doc = "Steps:\n\n1. Open the file.\n\n2. Edit it.\n\n3. Save it.\n"
    tokens = ["Steps", ":\n\n", "1", ".", " Open", " the", " file", ".\n\n", "2", ".", " Edit"]
    tokens += [" it", ".\n\n", "3", ".", " Save", " it", ".\n"]
    assert "".join(tokens) == doc
    r = StreamRenderer()
    for token in tokens:
        r.feed(token)
        r.update()
    r.update(final=True)
    assert "".join(r.blocks) == render(doc)


@pytest.mark.xfail(
    reason="a reference-style link is rendered before its definition arrives later in the "
    "reply, so the streamed block shows '[docs][1]' while the reloaded page shows a link",
    raises=AssertionError,
    strict=True,
)
def test_reference_link_defined_later_streams_like_the_whole():
    doc = "See [the docs][1].\n\nMore text.\n\n[1]: https://example.com\n"
    blocks, _, _ = stream(doc, [4])
    assert "".join(blocks) == render(doc)


def test_carriage_returns_alone_do_not_break_streaming():
    doc = "one\r\rtwo\r\rthree"
    blocks, _, _ = stream(doc, [3])
    assert "".join(blocks) == render(doc)


def test_windows_line_endings_stream_like_the_whole():
    doc = "one\r\n\r\ntwo\r\n\r\n- a\r\n- b\r\n\r\n```\r\ncode\r\n```\r\n"
    for sizes in ([1], [2], [3], [5]):
        blocks, _, _ = stream(doc, sizes)
        assert "".join(blocks) == render(doc)


# Budget: pathological input renders quickly, as safe plain text --------------------------------

# Inputs measured to cost markdown-it-py (and Pygments) seconds per 100 kB; each is just under
# the size cap, so only the time budget stands between it and a stalled worker.
N = 180_000
PATHOLOGICAL = {
    "unclosed brackets": "[" * (N // 2) + "a" + "]" * (N // 2),
    "unclosed links": "[a](" * (N // 4),
    "emphasis markers": "*a " * (N // 3),
    "mixed emphasis": "*_" * (N // 2) + "x",
    "one paragraph of many lines": "a\n" * (N // 2),
    "long table": "|a|b|\n|-|-|\n" + "|x|y|\n" * (N // 6),
    "nested quotes": "".join(">" * (i % 200) + " x\n" for i in range(N // 100)),
    "setext headings": "# h\n" * (N // 4),
    "big code blocks": ("```python\nx = [1, 'a']  # c\n" + "y = {'k': (2, 3)}\n" * 1000 + "```\n")
    * 10,
}


@pytest.fixture
def tight_budget(monkeypatch):
    """A small budget, so the bound is far below what these inputs cost without one."""
    import chat.markdown

    monkeypatch.setattr(chat.markdown, "RENDER_BUDGET", 0.2, raising=False)
    monkeypatch.setattr(chat.markdown, "TAIL_BUDGET", 0.1, raising=False)


def timed(fn, *args, **kwargs):
    import time

    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_markdown_renders_within_budget_and_safely(name, tight_budget):
    text = PATHOLOGICAL[name]
    out, took = timed(render, text)
    # Unbudgeted, each takes seconds on a quiet machine; the bound leaves room for a noisy one.
    assert took < 1.5, f"{name}: {took:.2f} s"
    doc = parse_html(out)
    assert {n.tag for n in doc.walk()} - {"#root"} <= ALLOWED_TAGS_SEEN
    assert "<script" not in out and "onerror" not in out


ALLOWED_TAGS_SEEN = {"p", "em", "strong", "br", "div", "a", "table", "thead", "tbody", "tr"} | {
    "th", "td", "blockquote", "h1", "pre", "code", "span", "ul", "li", "button",
}  # fmt: skip


def test_text_past_the_budget_is_shown_escaped_with_a_note(tight_budget):
    text = "[" * 50_000 + "<script>alert(1)</script> **not bold**\n\nsecond"
    doc = parse_html(render(text))
    assert "plain text" in doc.find("em").text
    assert "<script>alert(1)</script> **not bold**" in doc.text  # shown as typed
    assert doc.find_all("script") == [] and doc.find_all("strong") == []
    assert "second" in doc.text


def test_text_past_the_size_cap_is_plain_without_parsing():
    from chat.markdown import MAX_RENDER_CHARS

    text = "**bold** " * (MAX_RENDER_CHARS // 9 + 1)
    out, took = timed(render, text)
    assert "plain text" in out and "<strong>" not in out
    assert took < 1.5


def test_short_text_is_never_cut_short_by_the_budget(monkeypatch):
    import chat.markdown

    monkeypatch.setattr(chat.markdown, "RENDER_BUDGET", 0.0)
    assert "<strong>bold</strong>" in render("A **bold** claim.")


def test_huge_code_blocks_are_shown_unhighlighted():
    from chat.markdown import MAX_HIGHLIGHT_CHARS

    code = "x = 1\n" * (MAX_HIGHLIGHT_CHARS // 6 + 1)
    doc = tree(f"```python\n{code}```\n")
    assert doc.find("pre") is not None and "hl-" not in render(f"```python\n{code}```\n")


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_a_pathological_live_reply_updates_within_budget(name, tight_budget):
    text, r = PATHOLOGICAL[name], StreamRenderer()
    worst = 0.0
    for i in range(0, len(text), 10_000):
        r.feed(text[i : i + 10_000])
        _, took = timed(r.update)
        worst = max(worst, took)
    (new, tail), took = timed(r.update, final=True)
    assert max(worst, took) < 1.0, f"{name}: {max(worst, took):.2f} s"
    assert tail == ""
    whole = "".join(r.blocks)
    assert "<script" not in whole
    assert whole.count("plain text") <= 1  # the note, once, where formatting stopped


def test_a_live_reply_past_its_budget_goes_on_as_plain_text_and_loses_nothing(tight_budget):
    r = StreamRenderer()
    r.feed("# Title\n\nFine **so far**.\n\n")
    r.update()
    r.feed("[" * 60_000 + " <b>x</b>")
    r.update()
    assert r.plain
    r.feed("\n\nthen **more** text\n\nand the end")
    _, tail = r.update()
    assert "and the end" in tail
    r.update(final=True)
    doc = parse_html("".join(r.blocks))
    assert doc.find("h1").text == "Title" and "so far" in doc.text  # finished blocks stay
    assert "then **more** text" in doc.text and "and the end" in doc.text
    assert "<b>x</b>" in doc.text and doc.find_all("b") == []
    assert doc.text.count("[") == 60_000


# Code blocks: one box with a header bar, live and stored ------------------------------------


def code_boxes(html_text: str) -> list[Node]:
    return [
        d for d in parse_html(html_text).find_all("div") if "code-block" in d.attrs.get("class", "")
    ]


@pytest.mark.parametrize(
    ("markdown", "label"),
    [("```python\nx = 1\n```", "python"), ("~~~\nplain\n~~~", "text"), ("    indented", "text")],
)
def test_every_code_block_has_a_header_with_its_language_and_a_copy_button(markdown, label):
    (box,) = code_boxes(render(markdown))
    head, pre = (c for c in box.children if isinstance(c, Node))
    assert "code-head" in head.attrs["class"] and pre.tag == "pre"
    assert head.find("span").text == label
    button = head.find("button")
    # A plain button (never a submit), no handler: app.js copies by delegation.
    assert button.attrs == {"type": "button", "class": "copy-code"}
    assert button.text == "Copy code"
    assert pre.find_all("button") == []  # nothing floats over the code


def test_a_hostile_fence_language_cannot_change_the_header():
    out = render('```"><button onclick=alert(1) type=submit>x\ncode\n```')
    (box,) = code_boxes(out)
    assert [b.attrs for b in box.find_all("button")] == [{"type": "button", "class": "copy-code"}]
    assert "onclick" not in out


def test_sanitize_keeps_only_the_copy_button_as_generated():
    out = sanitize('<button type="submit" class="x" onclick="a()" formaction="/y">b</button>')
    assert out == "<button>b</button>"


def structure(html_text: str) -> list[tuple[str, str | None]]:
    """Elements and classes without the text and colours: the shape the reader sees."""
    return [
        (n.tag, n.attrs.get("class"))
        for n in parse_html(html_text).walk()
        if n.tag not in ("#root", "p") and not (n.attrs.get("class") or "").startswith("hl-")
    ]


def test_a_streaming_code_block_is_one_highlighted_box_like_the_finished_one():
    lines = [f"def f{i}(x):\n    return x + {i}  # line {i}\n" for i in range(40)]
    source = "Here:\n\n```python\n" + "".join(lines) + "```\n"
    r = StreamRenderer()
    live = []
    for piece in re.findall(r".{1,7}", source, flags=re.S):
        r.feed(piece)
        _new, tail = r.update()
        if "def f0" in r.source:
            live.append(tail)
            doc = parse_html(tail)
            assert len(code_boxes(tail)) == 1 and len(doc.find_all("pre")) == 1
            colours = [s for s in doc.find("pre").find_all("span") if s.attrs["class"] != "hl-w"]
            assert colours, "highlighted while it streams"
    assert len(live) > 100
    r.update(final=True)
    whole = render(source)
    assert "".join(r.blocks) == whole
    # Live and finished: the same box, header, pre and code, in the same order.
    assert structure(live[-1]) == structure(whole)
    assert structure(live[len(live) // 2]) == structure(whole)


# Math -------------------------------------------------------------------------------------


def test_inline_and_display_math_become_mathml():
    doc = tree("Euler: $e^{i\\pi} + 1 = 0$.\n\n$$\n\\frac{a}{b}\n$$")
    maths = doc.find_all("math")
    assert [m.attrs.get("display") for m in maths] == ["inline", "block"]
    assert maths[0].find("msup") is not None and maths[1].find("mfrac") is not None


@pytest.mark.parametrize(
    "prose",
    [
        "It costs $5 and $10 on Sundays.",
        "Between $5 and $10.",
        "I have $ 3 and you $ 4.",
        "A $ sign alone.",
        "Price: $5, or $10.50 with tax",
    ],
)
def test_dollar_signs_in_prose_stay_text(prose):
    out = render(prose)
    assert "<math" not in out
    assert tree(prose).text.strip() == prose


@pytest.mark.parametrize(
    "tex",
    [
        "\\href{javascript:alert(1)}{x}",
        "\\href{https://example.com}{x}",
        "<script>alert(1)</script>",
        "\\text{<img src=x onerror=alert(1)>}",
        "\\color{red}{x} \\style{background:url(x)}{y}",
        "x \\mathrm{</math><img src=x onerror=alert(1)>}",
        "\\begin{array}{c} a \\end{array",
        "\\frac{" * 400 + "x",
        "x^" * 3000,
    ],
)
@pytest.mark.parametrize("display", [False, True])
def test_hostile_math_is_shown_safely(tex, display):
    markdown = f"$${tex}$$" if display else f"Say ${tex}$ now."
    out = render(markdown)
    doc = parse_html(out)
    assert "<script" not in out and "<img" not in out
    for node in doc.walk():
        assert not any(a.startswith("on") for a in node.attrs), node.attrs
        assert not {"href", "style", "xlink:href", "src", "mathcolor", "mathbackground"} & set(
            node.attrs
        ), node.attrs
        assert node.tag not in ("annotation-xml", "script", "img", "style", "iframe")


def test_sanitize_drops_annotation_xml_and_links_in_mathml():
    hostile = (
        '<math><semantics><mi href="javascript:alert(1)">x</mi>'
        '<annotation-xml encoding="text/html"><img src=x onerror=alert(1)></annotation-xml>'
        "</semantics></math>"
    )
    out = sanitize(hostile)
    assert "annotation-xml" not in out and "href" not in out and "<img" not in out
    assert "<mi>x</mi>" in out


def test_math_streams_like_the_whole():
    text = "Inline $a^2+b^2=c^2$ here.\n\n$$\n\\sum_{i=1}^{n} i\n$$\n\nDone."
    r = StreamRenderer()
    for piece in re.findall(r".{1,5}", text, flags=re.S):
        r.feed(piece)
        r.update()
    r.update(final=True)
    assert "".join(r.blocks) == render(text)


# Tables -----------------------------------------------------------------------------------


def test_table_column_alignment_is_kept_as_classes():
    doc = tree("| L | C | R | N |\n|:--|:-:|--:|---|\n| 1 | 2 | 3 | 4 |")
    for row in doc.find_all("tr"):
        cells = [c for c in row.children if isinstance(c, Node)]
        assert [c.attrs.get("class") for c in cells] == [
            "align-left", "align-center", "align-right", None,
        ]  # fmt: skip
    assert "style" not in render("| L |\n|:-:|\n| 1 |")


def test_sanitize_allows_only_alignment_classes_on_cells():
    out = sanitize('<table><tr><td class="x align-left" style="color:red">a</td>'
                   '<th class="align-right">b</th></tr></table>')  # fmt: skip
    assert 'class="x' not in out and "style" not in out and 'class="align-right"' in out


def test_thousands_of_formulas_are_all_shown():
    text = " ".join(f"$x_{{{i}}}^2$" for i in range(3000))
    out = render(text)
    # Every formula is shown: as MathML, as its TeX source past the math budget, or (on a
    # machine too busy for the document's budget) in the plain-text fallback. How fast this
    # is belongs in bench/, not in a timed assertion here.
    if "Shown as plain text" in out:
        assert all(f"x_{{{i}}}^2" in out for i in (0, 1500, 2999))
    else:
        assert out.count("<math") + out.count('class="math-source"') == 3000
