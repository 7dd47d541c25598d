"""The live map page at ``/``: one self-contained HTML file shipped in the package (``static/map.html``).

The only thing filled in at start-up is the page's configuration (tile URL, public mode), as JSON
in a ``<script>`` element, with ``<`` escaped so that no value can end the element.
"""

from __future__ import annotations

from importlib import resources
from urllib.parse import urlsplit

import orjson

PLACEHOLDER = "/*GATEWAY_CONFIG*/null"


def page_html(*, tile_url: str, public: bool) -> bytes:
    text = resources.files(__package__).joinpath("static/map.html").read_text(encoding="utf-8")
    config = orjson.dumps({"tileUrl": tile_url or None, "public": public, "wsPath": "/ws"}).decode()
    assert PLACEHOLDER in text, "static/map.html lost its configuration placeholder"
    return text.replace(PLACEHOLDER, config.replace("<", "\\u003c")).encode()


def content_security_policy(tile_url: str) -> str:
    """Inline script and style only (the file is self-contained), the WebSocket back to us, tiles from their host."""
    images = "data:"
    if tile_url:
        parts = urlsplit(tile_url.replace("{s}", "a"))
        host = parts.netloc.replace("a.", "*.", 1) if "{s}" in tile_url else parts.netloc
        images += f" {parts.scheme}://{host}"
    return ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            f"connect-src 'self' ws: wss:; img-src {images}; base-uri 'none'; form-action 'none'")
