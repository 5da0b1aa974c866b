"""The web chat page of `lmforge serve`: the page at /, its files under /static, and GET /v1/lmforge/info.

The page is plain HTML, CSS and JavaScript in static/ (no build step, nothing fetched from elsewhere). It
talks to the server only through the public API: it streams replies from /v1/chat/completions and reads
the model's facts and the server's sampling defaults from /v1/lmforge/info, which, being under /v1, needs
the API key when the server has one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from ..checkpoint import read_meta
from ..model import param_breakdown

STATIC = Path(__file__).parent / "static"
INFO_PATH = "/v1/lmforge/info"
# The page loads only its own files and connects only to this server, so even a bug that let model text
# become markup could not run an inline script or fetch anything from another host.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new lmforge's page replaces an old one at the next load
}


def add_page(app: FastAPI, server, key_required: bool) -> None:
    """Serve the chat page at / and its files at /static/ (both open), and the info endpoint (under /v1).

    server: the app's shared state (its llm, name, max_tokens and sampling defaults).
    """
    # The page learns from its own HTML whether to ask for a key, so it never makes a request it knows
    # will be refused (each 401 would be an error in the browser's console).
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    html = html.replace('data-key-required="0"', f'data-key-required="{int(key_required)}"')
    facts: dict = {}  # gathered at the first request: the app may be built around a stand-in LLM

    async def index() -> HTMLResponse:
        return HTMLResponse(html, headers=PAGE_HEADERS)

    def info() -> dict:
        if not facts:
            facts.update(model_facts(server))
        return facts

    app.get("/", include_in_schema=False)(index)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.get(INFO_PATH)(info)


def model_facts(server) -> dict:
    """What the page shows of the model and the sampling defaults a request without those fields gets."""
    llm, d = server.llm, server.defaults
    return {
        "model": server.name,
        # From the config, so int8 weights (other module types) count the same parameters.
        "parameters": param_breakdown(llm.model.cfg)["total"],
        "context_length": llm.context_len,
        "training_tokens": _training_tokens(llm.checkpoint),
        "max_tokens": server.max_tokens,  # the most a request may ask for (under the context)
        "defaults": {
            "temperature": d.temperature,
            "top_k": d.top_k,
            "top_p": d.top_p,
            "min_p": d.min_p,
            "repetition_penalty": d.repetition_penalty,
            "frequency_penalty": d.frequency_penalty,
            "presence_penalty": d.presence_penalty,
            "max_tokens": d.max_new_tokens,
        },
    }


def _training_tokens(checkpoint: Path | None) -> int | None:
    """Tokens the checkpoint was trained on (its meta.json), None when unknown (an imported model)."""
    if checkpoint is None:
        return None
    tokens = read_meta(checkpoint).get("tokens")
    return tokens if isinstance(tokens, int) else None
