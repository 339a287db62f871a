"""What every page's <head> holds: our own CSS and scripts, and htmx's configuration."""

from __future__ import annotations

import json

from fasthtml.common import Link, Meta, Script

HTMX_CONFIG = {
    "selfRequestsOnly": True,
    "allowScriptTags": False,
    "allowEval": False,
    "historyCacheSize": 0,
    "includeIndicatorStyles": False,
    # Error answers (422 bad input, 404, 413, 429, 503) carry a message to show, so swap them.
    "responseHandling": [
        {"code": "204", "swap": False},
        {"code": "[23]..", "swap": True},
        {"code": "[45]..", "swap": True, "error": True},
    ],
}


def Head(static: str = "/static") -> tuple:
    """Everything in <head>: our own CSS and scripts only, no other origin."""
    return (
        Meta(charset="utf-8"),
        Meta(name="viewport", content="width=device-width, initial-scale=1"),
        Meta(name="color-scheme", content="light dark"),
        Meta(name="htmx-config", content=json.dumps(HTMX_CONFIG)),
        Link(rel="icon", href=f"{static}/favicon.svg", type="image/svg+xml"),
        Link(rel="stylesheet", href=f"{static}/app.css"),
        Link(rel="stylesheet", href=f"{static}/pygments.css"),
        Script(src=f"{static}/theme.js"),
        Script(src=f"{static}/vendor/htmx-2.0.11.min.js", defer=True),
        Script(src=f"{static}/vendor/htmx-ext-sse-2.2.4.min.js", defer=True),
        Script(src=f"{static}/app.js", defer=True),
    )
