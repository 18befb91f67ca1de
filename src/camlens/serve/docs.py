"""API docs at /docs that work offline.

FastAPI's default /docs and /redoc load Swagger UI and ReDoc from a CDN. When the
``fastapi-offline`` package is installed (it ships those files and serves them the way
FastAPI's self-hosting recipe describes), /docs is Swagger UI and /redoc is ReDoc, both from
local files. Without it, /docs is a plain page generated from the OpenAPI schema. Either way
nothing is fetched from the network; the schema itself is always at /openapi.json.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


def offline_fastapi(**settings: Any) -> FastAPI:
    """``FastAPI(**settings)`` whose /docs page needs no network (see the module docstring)."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:
        app = FastAPI(docs_url=None, redoc_url=None, **settings)

        @app.get("/docs", include_in_schema=False)
        def docs() -> HTMLResponse:
            return HTMLResponse(plain_docs(app.openapi()))

        return app
    return FastAPIOffline(**settings)


def plain_docs(schema: dict[str, Any]) -> str:
    """A self-contained HTML page listing every operation of an OpenAPI ``schema``."""
    info = schema.get("info", {})
    sections = []
    for path, operations in schema.get("paths", {}).items():
        for verb, operation in operations.items():
            sections.append(_operation_html(verb, path, operation, schema))
    title = html.escape(info.get("title", "API"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
  padding: 0 1rem; color: #1d2430; }}
code, pre {{ font: 13px ui-monospace, monospace; }}
section {{ border: 1px solid #d5dbe5; border-radius: 6px; padding: .5rem 1rem; margin: 1rem 0; }}
.verb {{ font-weight: 700; text-transform: uppercase; color: #2456a6; }}
td, th {{ text-align: left; padding: .15rem .6rem .15rem 0; vertical-align: top; }}
</style></head><body>
<h1>{title} <small>{html.escape(str(info.get("version", "")))}</small></h1>
<p>{html.escape(info.get("description", ""))}</p>
<p>Machine-readable schema: <a href="/openapi.json">/openapi.json</a>. Install
<code>fastapi-offline</code> for the interactive Swagger UI here.</p>
{"".join(sections)}
</body></html>"""


def _operation_html(verb: str, path: str, operation: dict, schema: dict) -> str:
    rows = [
        (p["name"], p.get("in", ""), p.get("description", ""))
        for p in operation.get("parameters", [])
    ]
    for content_type, body in operation.get("requestBody", {}).get("content", {}).items():
        properties = _resolve(body.get("schema", {}), schema).get("properties", {})
        for name, field in properties.items():
            rows.append((name, content_type, field.get("description", "")))
    table = "".join(
        f"<tr><td><code>{html.escape(n)}</code></td><td>{html.escape(w)}</td>"
        f"<td>{html.escape(d)}</td></tr>"
        for n, w, d in rows
    )
    codes = ", ".join(
        f"{html.escape(code)} {html.escape(r.get('description', ''))}"
        for code, r in operation.get("responses", {}).items()
    )
    return (
        f"<section><h2><span class=verb>{html.escape(verb)}</span> "
        f"<code>{html.escape(path)}</code></h2>"
        f"<p>{html.escape(operation.get('summary', ''))}</p>"
        f"<p>{html.escape(operation.get('description', ''))}</p>"
        + (
            f"<table><tr><th>field</th><th>in</th><th>meaning</th></tr>{table}</table>"
            if rows
            else ""
        )
        + f"<p>Responses: {codes}</p></section>"
    )


def _resolve(node: dict, schema: dict) -> dict:
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = schema
    for part in ref.lstrip("#/").split("/"):
        target = target.get(part, {})
    return target
