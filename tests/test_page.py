"""The web chat page's server side, without a browser: the page and its files, /v1/lmforge/info, and
`lmforge chat --web` (tests/test_web.py drives the page in Chromium)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import lmforge.serve
from lmforge.api import LLM
from lmforge.cli import main
from lmforge.generate.params import SamplingParams
from lmforge.model import param_breakdown
from lmforge.serve.app import create_app
from tests.gen_helpers import make_endless_run

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "src" / "lmforge" / "serve" / "static"
KEY = "page-test-key"


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    return make_endless_run(tiny_data, tmp_path_factory.mktemp("page") / "endless", tokens=1_234_567)


@pytest.fixture(scope="module")
def client(run):
    """The app with a key and sampling defaults of its own."""
    llm = LLM.load(run, device="cpu")
    sampling = SamplingParams(temperature=0.6, max_new_tokens=24)
    with TestClient(create_app(llm, max_tokens=8000, sampling=sampling, api_key=KEY)) as c:
        yield c


def test_info_needs_the_key_and_tells_the_model_and_the_defaults(client, run):
    assert client.get("/v1/lmforge/info").status_code == 401
    got = client.get("/v1/lmforge/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    model = LLM.load(run, device="cpu").model
    assert got == {
        "model": "endless",
        "parameters": param_breakdown(model.cfg)["total"],
        "context_length": 8192,
        "training_tokens": 1_234_567,
        "max_tokens": 8000,
        "defaults": {
            "temperature": 0.6,
            "top_k": 50,
            "top_p": None,
            "min_p": None,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "max_tokens": 24,
        },
    }
    assert got["parameters"] == sum(p.numel() for p in model.parameters())


def test_the_page_is_open_and_forbids_anything_from_elsewhere(client):
    page = client.get("/")  # no key: the page itself asks for it
    assert page.status_code == 200 and "lmforge chat" in page.text
    assert 'data-key-required="1"' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ("chat.js", "chat.css", "icon.svg"):
        assert client.get(f"/static/{name}").status_code == 200
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 401


def test_the_page_sets_no_markup_from_text_and_names_no_other_host():
    js = (STATIC / "chat.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js
    for name in ("index.html", "chat.js", "chat.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text, name


def test_the_static_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p.relative_to(ROOT / "src" / "lmforge").as_posix() for p in STATIC.iterdir()]
    assert len(shipped) >= 4
    for path in shipped:
        assert any(fnmatch.fnmatch(path, g) for g in globs["lmforge"]), path


def test_chat_web_serves_the_page_on_localhost_and_prints_its_address(run, monkeypatch, capsys):
    served = {}
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    monkeypatch.setattr(
        lmforge.serve, "run_server", lambda app, host, port, *a: served.update(app=app, host=host, port=port)
    )
    assert main(["chat", "--web", "--run", str(run), "--port", "8123", "--device", "cpu"]) in (0, None)
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    assert "chat page:  http://127.0.0.1:8123/\n" in capsys.readouterr().out
    with TestClient(served["app"]) as web:
        assert 'data-key-required="0"' in web.get("/").text  # no key: the page does not ask for one
        assert web.get("/v1/lmforge/info").json()["model"] == "endless"


def test_chat_web_refuses_system_in_one_line(run, capsys):
    assert main(["chat", "--web", "--run", str(run), "--system", "be brief"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--system is for the terminal chat" in err and len(err.splitlines()) == 1
