"""Attachments through the app as a browser uses it: upload, limits, sniffing, ownership,
binding on send, what reached the model, how files are served, stored, exported and imported."""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib

import pytest
from pydantic_ai.messages import BinaryContent, ModelRequest, TextContent, UserPromptPart
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.profiles import ModelProfile
from starlette.testclient import TestClient

from chat.attachments import HISTORY_FILES, AttachmentError, sniff
from tests.conftest import HX, connect_db, manage_args, parse_html, send, stream


def png(width: int = 2, height: int = 2, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real, tiny PNG (browsers draw it), made without an imaging library."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PNG = png()
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32
GIF = b"GIF89a" + b"\x01\x00\x01\x00" + b"\x00" * 16
WEBP = b"RIFF\x20\x00\x00\x00WEBPVP8 " + b"\x00" * 20
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
)


def upload(client, data: bytes, name: str = "file.bin", content_type: str = "application/x-evil"):
    """POST a file the way the composer does (multipart, field `file`)."""
    return client.post("/attachments", files={"file": (name, data, content_type)}, headers=HX)


def uploaded(client, data: bytes, name: str = "file.bin", **kw) -> str:
    """Upload a file that must be accepted; its attachment id."""
    r = upload(client, data, name, **kw)
    assert r.status_code == 201, r.text
    return parse_html(r.text).find("input", name="att").attrs["value"]


def vision(client_factory, model, **overrides):
    """A client whose (scripted) model is configured by name, so it is not the demo model."""
    return client_factory(model, models=("vision",), **overrides)


def prompt_items(messages) -> list:
    """The content items of the last user prompt in `messages`."""
    request = [m for m in messages if isinstance(m, ModelRequest)][-1]
    part = next(p for p in request.parts if isinstance(p, UserPromptPart))
    return [part.content] if isinstance(part.content, str) else list(part.content)


def pending_count(settings) -> int:
    with connect_db(settings) as db:
        return db.execute("select count(*) from attachments where turn_id is null").fetchone()[0]


def turn_count(settings) -> int:
    with connect_db(settings) as db:
        return db.execute("select count(*) from turns").fetchone()[0]


# Sniffing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,name,expected",
    [
        (PNG, "photo.txt", "image/png"),
        (JPEG, "x", "image/jpeg"),
        (GIF, "a.png", "image/gif"),
        (WEBP, "w.jpg", "image/webp"),
        (PDF, "doc.txt", "application/pdf"),
        ("# Notes\n\nhéllo\n".encode(), "notes.md", "text/markdown"),
        (b"plain text\r\n\ttabbed", "notes.png", "text/plain"),
        ("\ufeffwith a byte order mark".encode(), "bom.txt", "text/plain"),
    ],
)
def test_the_type_comes_from_the_bytes_not_the_name(data, name, expected):
    assert sniff(data, name) == expected


@pytest.mark.parametrize(
    "data,name",
    [
        (SVG, "pic.png"),
        (b"<svg onload=alert(1)>", "x.txt"),
        (b"just text", "evil.svg"),
        (b"MZ\x90\x00\x03\x00\x00\x00", "setup.png"),  # a Windows program
        (b"\x7fELF\x02\x01\x01", "notes.txt"),
        (b"PK\x03\x04" + b"\x00" * 20, "doc.pdf"),  # a zip
        (b"\xff\xfe\x00\x00bad utf", "x.txt"),
        (b"text with a \x00 NUL", "x.txt"),
    ],
)
def test_files_that_are_not_images_pdfs_or_clean_text_are_refused(data, name):
    with pytest.raises(AttachmentError):
        sniff(data, name)


# Upload ---------------------------------------------------------------------------------------


def test_an_upload_answers_a_chip_and_is_served_to_its_owner_with_safe_headers(client, settings):
    r = upload(client, PNG, "cat photo.png", "text/html")
    assert r.status_code == 201
    chip = parse_html(r.text).find(**{"class": "att-chip"})
    aid = chip.find("input", name="att").attrs["value"]
    assert chip.find("img").attrs["src"] == f"/attachments/{aid}"
    assert "cat photo.png" in chip.text
    assert chip.find("button").attrs["hx-post"] == f"/attachments/{aid}/remove"

    served = client.get(f"/attachments/{aid}")
    assert served.status_code == 200
    assert served.content == PNG
    assert served.headers["content-type"] == "image/png"  # sniffed, not the text/html claimed
    assert served.headers["content-disposition"].startswith("inline;")
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.headers["content-security-policy"].startswith("default-src 'none'")
    assert pending_count(settings) == 1


@pytest.mark.parametrize(
    "data,name,media_type",
    [
        (PDF, "report.pdf", "application/pdf"),
        (b"<html><script>alert(1)</script></html>", "page.html", "text/plain; charset=utf-8"),
        (b"# Title", "notes.md", "text/markdown; charset=utf-8"),
    ],
)
def test_files_other_than_raster_images_are_served_as_downloads(client, data, name, media_type):
    aid = uploaded(client, data, name, content_type="image/png")
    served = client.get(f"/attachments/{aid}")
    assert served.headers["content-type"] == media_type
    assert served.headers["content-disposition"].startswith("attachment;")
    assert served.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in served.headers["content-security-policy"]


@pytest.mark.parametrize(
    "data,name", [(SVG, "logo.svg"), (SVG, "logo.png"), (b"MZ\x90\x00", "a.exe")]
)
def test_a_refused_upload_says_why_and_stores_nothing(client, settings, data, name):
    r = upload(client, data, name, "image/png")
    assert r.status_code == 415
    assert r.headers["HX-Retarget"] == "#composer-error"
    assert "not accepted" in r.text
    assert pending_count(settings) == 0


def test_the_size_limit_is_exact_and_a_larger_file_changes_nothing(make_client, model, settings):
    client = make_client(model, max_attachment_bytes=1000)
    text = b"a" * 1000
    assert upload(client, text, "ok.txt").status_code == 201
    r = upload(client, text + b"a", "big.txt")
    assert r.status_code == 413
    assert "1,001 bytes; the limit is 1,000 bytes" in r.text
    assert pending_count(settings) == 1


def test_a_body_far_over_the_limit_is_refused(make_client, model, settings):
    client = make_client(model, max_attachment_bytes=1000)
    r = upload(client, b"a" * 200_000, "huge.txt")
    assert r.status_code == 413
    assert pending_count(settings) == 0


def test_an_empty_or_missing_file_is_refused(client, settings):
    assert upload(client, b"", "empty.txt").status_code == 422
    r = client.post("/attachments", data={"x": "y"}, headers=HX)
    assert r.status_code == 422
    assert pending_count(settings) == 0


def test_pending_files_per_user_are_bounded(make_client, model, settings):
    client = make_client(model, max_attachments=1)  # 4 may wait
    for i in range(4):
        uploaded(client, b"note %d" % i, f"{i}.txt")
    r = upload(client, b"one more", "5.txt")
    assert r.status_code == 429
    assert pending_count(settings) == 4


# Ownership ----------------------------------------------------------------------------------


def test_another_browser_can_neither_see_nor_remove_a_file(client, other_browser):
    aid = uploaded(client, PNG, "mine.png")
    assert other_browser.get(f"/attachments/{aid}").status_code == 404
    assert other_browser.post(f"/attachments/{aid}/remove", headers=HX).status_code == 404
    assert client.get(f"/attachments/{aid}").status_code == 200


def test_removing_a_chip_drops_the_pending_file(client, settings):
    aid = uploaded(client, PNG, "x.png")
    r = client.post(f"/attachments/{aid}/remove", headers=HX)
    assert r.status_code == 200 and r.text == ""
    assert client.get(f"/attachments/{aid}").status_code == 404
    assert pending_count(settings) == 0


# Sending ------------------------------------------------------------------------------------


def test_files_are_bound_on_send_and_reach_the_model_as_binary_content(make_client, scripted):
    model = scripted(["Seen."])
    client = vision(make_client, model)
    image = uploaded(client, PNG, "cat.png")
    doc = uploaded(client, PDF, "report.pdf")
    r = send(client, "What is this?", att=[image, doc])
    stream(client, r.text)

    items = prompt_items(model.calls[0])
    assert items[0] == "What is this?"
    binaries = [i for i in items if isinstance(i, BinaryContent)]
    assert [(b.media_type, b.data) for b in binaries] == [
        ("image/png", PNG),
        ("application/pdf", PDF),
    ]
    notes = [i.content for i in items if isinstance(i, TextContent)]
    assert any("cat.png" in n for n in notes) and any("report.pdf" in n for n in notes)

    user = parse_html(r.text).find(data_role="user")
    assert user.find("img", **{"class": "msg-thumb"}).attrs["src"] == f"/attachments/{image}"
    assert "report.pdf" in user.find("a", **{"class": "att-chip file-chip"}).text


def test_text_files_reach_the_model_as_text_with_their_name(make_client, scripted):
    model = scripted(["Ok."])
    client = vision(make_client, model)
    aid = uploaded(client, b"line one\nline two", "notes.md")
    stream(client, send(client, "Summarize", att=[aid]).text)
    items = prompt_items(model.calls[0])
    texts = [i.content for i in items if isinstance(i, TextContent)]
    assert any('<file name="notes.md">' in t and "line one\nline two" in t for t in texts)
    assert not [i for i in items if isinstance(i, BinaryContent)]


def test_the_stored_history_holds_notes_not_file_bytes(make_client, scripted, settings):
    model = scripted(["Seen."])
    client = vision(make_client, model)
    big = PNG + bytes(range(256)) * 200  # 50 KB that do not compress away
    aid = uploaded(client, big, "big.png")
    stream(client, send(client, "Look", att=[aid]).text)
    with connect_db(settings) as db:
        raw, listed = db.execute("select messages, attachments from turns").fetchone()
    assert len(raw) < 3000, "the turn's messages must not carry the file"
    assert '"attachment"' in raw and "big.png" in raw
    assert json.loads(listed)[0]["id"] == aid


def test_a_page_shows_the_files_after_reload(make_client, scripted):
    client = vision(make_client, scripted(["Ok."]))
    aid = uploaded(client, PNG, "cat.png")
    doc = uploaded(client, b"hello", "hello.txt")
    r = send(client, "Look", att=[aid, doc])
    stream(client, r.text)
    page = parse_html(client.get(r.headers["HX-Push-Url"]).text)
    user = page.find(data_role="user")
    assert user.find("img", **{"class": "msg-thumb"}).attrs["src"] == f"/attachments/{aid}"
    chip = user.find("a", **{"class": "att-chip file-chip"})
    assert "hello.txt" in chip.text and "5 bytes" in chip.text


def test_earlier_files_are_resent_up_to_the_limit(make_client, scripted):
    model = scripted(["Ok."])
    client = vision(make_client, model)
    cid = ""
    for i in range(HISTORY_FILES + 2):
        aid = uploaded(client, png(1, 1, (i, i, i)), f"{i}.png")
        r = send(client, f"image {i}", cid=cid, att=[aid])
        cid = cid or re.search(r"/c/([^\"?/]+)", r.headers["HX-Push-Url"]).group(1)
        stream(client, r.text)
    last = model.calls[-1]
    history, current = last[:-1], prompt_items(last)
    sent_before = [
        item
        for m in history
        if isinstance(m, ModelRequest)
        for p in m.parts
        if isinstance(p, UserPromptPart) and not isinstance(p.content, str)
        for item in p.content
        if isinstance(item, BinaryContent)
    ]
    assert len(sent_before) == HISTORY_FILES
    # The newest earlier files are the ones re-sent.
    newest = [png(1, 1, (i, i, i)) for i in range(1, HISTORY_FILES + 1)]
    assert [b.data for b in sent_before] == newest
    assert [i.data for i in current if isinstance(i, BinaryContent)] == [png(1, 1, (5, 5, 5))]


def test_a_file_already_sent_or_not_yours_is_refused_and_nothing_changes(
    make_client, scripted, settings, other_browser_factory
):
    client = vision(make_client, scripted(["Ok."]))
    aid = uploaded(client, PNG, "x.png")
    stream(client, send(client, "first", att=[aid]).text)
    turns = turn_count(settings)
    r = client.post("/send", data={"msg": "again", "att": aid}, headers=HX)
    assert r.status_code == 409
    assert "already sent or removed" in r.text
    other = other_browser_factory(client)
    theirs = uploaded(other, PNG, "theirs.png")
    r = client.post("/send", data={"msg": "steal", "att": theirs}, headers=HX)
    assert r.status_code == 409
    assert turn_count(settings) == turns
    assert pending_count(settings) == 1  # the other browser's file still waits for them


def test_too_many_files_in_one_message_are_refused(make_client, scripted, settings):
    client = vision(make_client, scripted(["Ok."]), max_attachments=2)
    ids = [uploaded(client, b"n%d" % i, f"{i}.txt") for i in range(3)]
    r = client.post("/send", data={"msg": "all", "att": ids}, headers=HX)
    assert r.status_code == 422
    assert "2 files at most" in r.text
    assert turn_count(settings) == 0 and pending_count(settings) == 3


def test_a_model_that_cannot_read_images_says_so_and_keeps_the_files(make_client, settings):
    async def never(messages, info):  # pragma: no cover - must not be called
        yield "unreachable"

    blind = FunctionModel(stream_function=never, profile=ModelProfile(supports_image_input=False))
    client = make_client(blind, models=("text-only",))
    aid = uploaded(client, PNG, "x.png")
    r = client.post("/send", data={"msg": "see?", "att": aid}, headers=HX)
    assert r.status_code == 422
    assert "text-only cannot read images" in r.text
    assert turn_count(settings) == 0 and pending_count(settings) == 1
    # Text files work with every model.
    note = uploaded(client, b"plain words", "words.txt")
    r = client.post("/send", data={"msg": "read", "att": note}, headers=HX)
    assert r.status_code == 200


def test_the_demo_model_says_it_reads_no_images_or_pdfs(make_client, settings):
    client = make_client(None)  # no MODEL: the offline demo
    for data, name, what in ((PNG, "x.png", "images"), (PDF, "y.pdf", "PDFs")):
        aid = uploaded(client, data, name)
        r = client.post("/send", data={"msg": "see?", "att": aid}, headers=HX)
        assert r.status_code == 422
        assert f"The offline demo model cannot read {what}" in r.text
    assert turn_count(settings) == 0


def test_regenerate_sends_the_same_files_again(make_client, scripted):
    model = scripted(["Ok."])
    client = vision(make_client, model)
    aid = uploaded(client, PNG, "x.png")
    r = send(client, "look", att=[aid])
    stream(client, r.text)
    regen = parse_html(client.get(r.headers["HX-Push-Url"]).text).find(
        "button", hx_target="#messages", hx_swap="innerHTML"
    )
    again = client.post(regen.attrs["hx-post"], headers=HX)
    assert again.status_code == 200
    stream(client, again.text)
    assert [i.data for i in prompt_items(model.calls[-1]) if isinstance(i, BinaryContent)] == [PNG]
    assert f"/attachments/{aid}" in again.text


@pytest.fixture
def other_browser_factory():
    from starlette.testclient import TestClient

    def make(client):
        other = TestClient(client.app)
        other.portal = client.portal
        return other

    return make


# Exports and imports ------------------------------------------------------------------------


def _conversation_with_files(client) -> str:
    """Send a message with an image and a PDF; the conversation's URL."""
    image = uploaded(client, PNG, "cat.png")
    doc = uploaded(client, PDF, "report.pdf")
    r = send(client, "Look at these", att=[image, doc])
    stream(client, r.text)
    return r.headers["HX-Push-Url"]


def test_the_markdown_export_lists_the_files(make_client, scripted):
    client = vision(make_client, scripted(["Seen."]))
    url = _conversation_with_files(client)
    md = client.get(url + "/export.md").text
    assert "- Attached: cat.png (image/png, " in md
    assert "- Attached: report.pdf (application/pdf, " in md


def test_the_json_export_carries_the_files_and_imports_whole(make_client, scripted):
    client = vision(make_client, scripted(["Seen."]))
    url = _conversation_with_files(client)
    exported = client.get(url + "/export.json").content
    items = json.loads(exported)[0]["parts"][0]["content"]
    binaries = [i for i in items if isinstance(i, dict) and i.get("kind") == "binary"]
    assert [(b["media_type"], b["data"]) for b in binaries] == [
        ("image/png", base64.b64encode(PNG).decode()),
        ("application/pdf", base64.b64encode(PDF).decode()),
    ]

    other = TestClient(client.app)
    other.portal = client.portal
    r = other.post(
        "/import", files={"file": ("chat.json", exported, "application/json")}, headers=HX
    )
    assert r.status_code == 204, r.text
    page = parse_html(other.get(r.headers["HX-Redirect"]).text)
    user = page.find(data_role="user")
    src = user.find("img", **{"class": "msg-thumb"}).attrs["src"]
    assert other.get(src).content == PNG
    assert "report.pdf" in user.find("a", **{"class": "att-chip file-chip"}).text
    assert client.get(src).status_code == 404  # the importer's copy is theirs alone


def test_an_import_resniffs_files_and_holds_them_to_the_limits(make_client, scripted, settings):
    client = vision(make_client, scripted(["Ok."]), max_attachment_bytes=100)
    history = [
        {
            "kind": "request",
            "parts": [
                {
                    "part_kind": "user-prompt",
                    "content": [
                        "hello",
                        {
                            "kind": "binary",
                            "media_type": "image/png",
                            "data": base64.b64encode(SVG).decode(),
                        },
                        {
                            "kind": "binary",
                            "media_type": "image/png",
                            "data": base64.b64encode(png(40, 40)).decode(),
                        },
                        {
                            "kind": "binary",
                            "media_type": "text/html",
                            "data": base64.b64encode(PNG).decode(),
                        },
                        {
                            "kind": "binary",
                            "media_type": "image/png",
                            "data": base64.b64encode(PNG).decode(),
                        },
                        {"kind": "image-url", "url": "http://169.254.169.254/latest/meta-data"},
                    ],
                }
            ],
        },
        {"kind": "response", "parts": [{"part_kind": "text", "content": "hi"}]},
    ]
    r = client.post(
        "/import",
        files={"file": ("h.json", json.dumps(history).encode(), "application/json")},
        headers=HX,
    )
    assert r.status_code == 204, r.text
    with connect_db(settings) as db:
        kept = db.execute("select media_type, data from attachments").fetchall()
        raw = db.execute("select messages from turns").fetchone()[0]
    # Only the real PNG within the limit that is what it claims is kept.
    assert kept == [("image/png", PNG)]
    assert "169.254" not in raw
    assert raw.count("left out") == 4  # the SVG, the big PNG, the PNG called HTML, the URL


def test_a_reply_whose_model_cannot_read_its_files_fails_saying_so(
    make_client, scripted, monkeypatch
):
    model = scripted(["Seen."])
    client = vision(make_client, model)
    aid = uploaded(client, PNG, "x.png")
    r = send(client, "look", att=[aid])
    stream(client, r.text)
    url = r.headers["HX-Push-Url"]
    # The conversation's model no longer takes images (switched, or its profile corrected).
    sighted = FunctionModel.profile
    blind = property(lambda self: ModelProfile(supports_image_input=False))
    monkeypatch.setattr(FunctionModel, "profile", blind)

    # A new message: the earlier image stays a note, the reply goes on without it.
    cid = url.rsplit("/", 1)[1]
    stream(client, send(client, "and now?", cid=cid).text)
    seen = model.calls[-1]
    assert not [
        i
        for m in seen
        if isinstance(m, ModelRequest)
        for p in m.parts
        if isinstance(p, UserPromptPart) and not isinstance(p.content, str)
        for i in p.content
        if isinstance(i, BinaryContent)
    ]
    assert "[Attached file: x.png (image/png" in json.dumps(
        [str(p.content) for m in seen for p in m.parts if isinstance(p, UserPromptPart)]
    )

    # Regenerating the message with the image: the reply fails with a clear message, and the
    # message keeps its text and its file.
    # (In a conversation of its own: only the last reply may be regenerated.)
    monkeypatch.setattr(FunctionModel, "profile", sighted)
    r = send(client, "look", att=[uploaded(client, PNG, "x.png")])
    stream(client, r.text)
    url = r.headers["HX-Push-Url"]
    monkeypatch.setattr(FunctionModel, "profile", blind)
    cid = url.rsplit("/", 1)[1]
    tid = parse_html(client.get(url).text).find_all(data_role="user")[0].attrs["id"][5:]
    calls = len(model.calls)
    again = client.post(f"/c/{cid}/turns/{tid}/regenerate", headers=HX)
    if "sse-connect" in again.text:  # still running when the view was made
        stream(client, again.text)
    shown = parse_html(client.get(url).text)
    alerts = [a.text for a in shown.find_all(role="alert")]
    assert any("The model vision cannot read images" in a for a in alerts), alerts
    assert shown.find("img", **{"class": "msg-thumb"})
    assert len(model.calls) == calls  # the model was never asked


def test_erasing_a_conversation_erases_its_files_and_stale_pending_ones_go(
    make_client, scripted, settings
):
    client = vision(make_client, scripted(["Ok."]))
    aid = uploaded(client, PNG, "x.png")
    r = send(client, "look", att=[aid])
    stream(client, r.text)
    cid = r.headers["HX-Push-Url"].rsplit("/", 1)[1]
    store = client.app.state.store
    assert store.erase(cid)
    with connect_db(settings) as db:
        assert db.execute("select count(*) from attachments").fetchone()[0] == 0
    # A file uploaded and never sent is dropped at that user's next upload after a day.
    old = uploaded(client, b"old", "old.txt")
    with connect_db(settings) as db:
        db.execute("update attachments set created_at = '2000-01-01T00:00:00.000+00:00'")
    uploaded(client, b"new", "new.txt")
    assert client.get(f"/attachments/{old}").status_code == 404
    assert pending_count(settings) == 1


def test_an_edit_and_a_side_by_side_send_carry_the_files(make_client, scripted):
    model = scripted(["Ok."])
    client = make_client(model, models=("a", "b"))
    aid = uploaded(client, PNG, "x.png")
    r = client.post("/send", data={"msg": "both?", "att": aid, "compare": ["a", "b"]}, headers=HX)
    assert r.status_code == 200, r.text
    for url in re.findall(r'sse-connect="([^"]+)"', r.text):
        with client.stream("GET", url) as s:
            b"".join(s.iter_bytes())
    assert len(model.calls) == 2
    for call in model.calls:
        assert [i.data for i in prompt_items(call) if isinstance(i, BinaryContent)] == [PNG]

    tid = re.search(r'id="turn-(\d+)"', r.text).group(1)
    cid = r.headers["HX-Push-Url"].rsplit("/", 1)[1]
    form = client.get(f"/c/{cid}/turns/{tid}/edit", headers=HX)
    assert f"/attachments/{aid}" in form.text  # the edit shows the files it will send
    edited = client.post(f"/c/{cid}/turns/{tid}/edit", data={"msg": "edited"}, headers=HX)
    assert edited.status_code == 200
    stream(client, edited.text)
    assert prompt_items(model.calls[-1])[0] == "edited"
    assert [i.data for i in prompt_items(model.calls[-1]) if isinstance(i, BinaryContent)] == [PNG]


def test_the_migration_makes_the_attachments_table_and_the_turns_column():
    from chat.store import ChatStore

    store = ChatStore(":memory:")
    assert store.db["attachments"].columns_dict == {
        "id": str,
        "owner": str,
        "turn_id": int,
        "name": str,
        "media_type": str,
        "size": int,
        "data": bytes,
        "created_at": str,
    }
    assert store.db["turns"].columns_dict["attachments"] is str
    (fk,) = store.db["attachments"].foreign_keys
    assert (fk.column, fk.other_table, fk.other_column) == ("turn_id", "turns", "id")


def test_manage_export_carries_the_files(make_client, scripted, settings, capsys):
    import manage

    client = vision(make_client, scripted(["Seen."]))
    url = _conversation_with_files(client)
    cid = url.rsplit("/", 1)[1]
    assert manage.main([*manage_args(settings), "export", cid, "--format", "json"]) == 0
    items = json.loads(capsys.readouterr().out)[0]["parts"][0]["content"]
    assert base64.b64encode(PNG).decode() in [i.get("data") for i in items if isinstance(i, dict)]


def test_pending_files_a_day_old_are_dropped_at_start_up(make_client, model, settings):
    client = make_client(model)
    aid = uploaded(client, b"forgotten", "f.txt")
    with connect_db(settings) as db:
        db.execute("update attachments set created_at = '2000-01-01T00:00:00.000+00:00'")
    client.__exit__(None, None, None)
    restarted = make_client(model)
    assert pending_count(settings) == 0
    assert restarted.get(f"/attachments/{aid}").status_code == 404


def test_a_file_name_is_a_label_and_unicode_names_download_intact(client):
    aid = uploaded(client, b"notes", "C:\\fakepath\\f\u00eate\r\nX-Evil: 1.md")
    served = client.get(f"/attachments/{aid}")
    disposition = served.headers["content-disposition"]
    assert "x-evil" not in {k.lower() for k in served.headers}
    assert disposition.startswith('attachment; filename="f?te')  # an ASCII stand-in
    assert "filename*=UTF-8''f%C3%AAte" in disposition and "\r" not in disposition
    assert served.headers["content-type"] == "text/markdown; charset=utf-8"


def test_files_alone_are_a_message(make_client, scripted, settings):
    model = scripted(["Nice picture."])
    client = vision(make_client, model)
    assert client.post("/send", data={"msg": " "}, headers=HX).status_code == 422
    aid = uploaded(client, PNG, "x.png")
    r = client.post("/send", data={"msg": "", "att": aid}, headers=HX)
    assert r.status_code == 200, r.text
    stream(client, r.text)
    items = prompt_items(model.calls[0])
    assert not [i for i in items if isinstance(i, str)]  # no empty text part
    assert [i.data for i in items if isinstance(i, BinaryContent)] == [PNG]
    # It exports and imports as a turn of its own.
    exported = client.get(r.headers["HX-Push-Url"] + "/export.json").content
    r = client.post("/import", files={"file": ("c.json", exported, "application/json")}, headers=HX)
    assert r.status_code == 204, r.text
    page = parse_html(client.get(r.headers["HX-Redirect"]).text)
    assert page.find(data_role="user").find("img", **{"class": "msg-thumb"})
