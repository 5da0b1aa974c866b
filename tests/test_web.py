"""The web chat page of `lmforge serve`, in a real browser: headless Chromium driven by Selenium against the
real server of a tiny run, started in a subprocess with an API key (test_page.py: the same without a browser).

The browser tests need Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`)
and are skipped, in one line, without them. The served model writes " the" for ever (make_endless_run), so
a reply is as long as max_tokens asks: long enough to watch it stream and to stop it half-way.

Screenshots for the docs, from a real session with a trained run (from the repository's root):
    PYTHONPATH=src python -m tests.test_web RUN_DIR docs
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.gen_helpers import ENDLESS_WORD, make_endless_run

ROOT = Path(__file__).resolve().parents[1]
KEY = "web-test-key"
TRAINED_TOKENS = 1_234_567  # written in the served checkpoint's meta: the page shows "1.2M"
INSTALL = (
    "needs Chromium and its driver: apt-get install chromium chromium-driver (as root), pip install selenium"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float = 10.0, what: str = "the page") -> object:
    """check()'s first truthy value, polled every 20 ms; fails after timeout seconds."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---- the served run and the server ----


def start_server(args: list[str], port: int) -> subprocess.Popen:
    """`python -m lmforge ARGS` in a subprocess, once its /health answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("LMFORGE_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"`lmforge {' '.join(args)}` did not come up") from None
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    return make_endless_run(tiny_data, tmp_path_factory.mktemp("web") / "endless", tokens=TRAINED_TOKENS)


@pytest.fixture(scope="module")
def server(run):
    """`lmforge serve` with a key, sampling defaults of its own, and room for a long reply: its URL."""
    port = free_port()
    args = ["serve", "--run", str(run), "--port", str(port), "--device", "cpu", "--api-key", KEY]
    args += ["--max-tokens", "8000", "--temperature", "0.6", "--max-new-tokens", "24"]
    proc = start_server(args, port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def generating(url: str) -> int:
    """Generations the server is running now (its /health)."""
    return httpx.get(f"{url}/health", timeout=10).json()["generating"]


# ---- the browser ----

# Run in the page before its own scripts: record alert() calls and what each fetch sent, and answer the
# next request with window.__answer ({status, message}) instead of the server, once, when a test sets it.
SPY = """
window.__alerts = [];
window.alert = (m) => { window.__alerts.push(String(m)); };
window.__sent = [];
window.__answer = null;
const realFetch = window.fetch.bind(window);
window.fetch = (url, opts) => {
  const o = opts || {};
  window.__sent.push({url: String(url), body: o.body || null, auth: (o.headers || {}).Authorization || null});
  const answer = window.__answer;
  window.__answer = null;
  if (answer) {
    const body = JSON.stringify({error: {message: answer.message, type: "x", param: null, code: null}});
    return Promise.resolve(new Response(body, {status: answer.status}));
  }
  return realFetch(url, opts);
};
"""


def chromium():
    """A headless Chromium with its console and network logs kept, or a skip saying how to install it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(INSTALL)
    webdriver = pytest.importorskip("selenium.webdriver", reason=INSTALL)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    opts.set_capability("unhandledPromptBehavior", "ignore")  # an alert stays open, for the test to see
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": SPY})
    return drv


@pytest.fixture(scope="module")
def browser():
    drv = chromium()
    yield drv
    drv.quit()


def visible(drv, css: str) -> bool:
    return drv.execute_script(
        "const e = document.querySelector(arguments[0]); return !!e && e.getClientRects().length > 0;",
        css,
    )


def enter_key(drv, key: str) -> None:
    wait_for(lambda: visible(drv, "#key-panel"), what="the key panel")
    drv.find_element("id", "key-input").send_keys(key)
    drv.find_element("id", "key-save").click()


def open_page(drv, url: str):
    """The page, fresh, with the key given once per tab; waits for the model's details."""
    drv.get(url + "/")
    if drv.execute_script("return sessionStorage.getItem('lmforge.apiKey')") is None:
        enter_key(drv, KEY)
    wait_for(lambda: "parameters" in drv.find_element("id", "model-line").text, what="the model line")
    return drv


def set_field(drv, field_id: str, value) -> None:
    el = drv.find_element("id", field_id)
    el.clear()
    el.send_keys(str(value))


def say(drv, text: str) -> None:
    """Type a one-line message and press Enter."""
    drv.find_element("id", "input").send_keys(text + "\n")


def say_lines(drv, text: str) -> None:
    """A message with line breaks (typing "\\n" would send it): set the box, then click Send."""
    drv.execute_script("document.getElementById('input').value = arguments[0];", text)
    drv.find_element("id", "send").click()


def bodies(drv, role: str) -> list[str]:
    return drv.execute_script(
        "return [...document.querySelectorAll('.msg.' + arguments[0] + ' .body')].map(e => e.textContent);",
        role,
    )


def idle(drv) -> bool:
    return visible(drv, "#send") and not visible(drv, "#stop")


def sent_bodies(drv) -> list[dict]:
    sent = drv.execute_script("return window.__sent;")
    return [json.loads(s["body"]) for s in sent if s["url"].endswith("/v1/chat/completions")]


# ---- tests in the browser ----


def test_the_page_asks_for_the_key_once_and_keeps_it_in_the_tab(browser, server):
    drv = browser
    drv.get(server + "/")
    drv.execute_script("sessionStorage.clear();")
    drv.refresh()
    enter_key(drv, "wrong-key")
    wait_for(lambda: "refused" in drv.find_element("id", "key-message").text, what="the refusal")
    enter_key(drv, KEY)
    line = (
        wait_for(lambda: "parameters" in drv.find_element("id", "model-line").text, what="the model line")
        and drv.find_element("id", "model-line").text
    )
    assert line.startswith("endless · ") and "8192-token context" in line and "trained on 1.2M tokens" in line
    assert not visible(drv, "#key-panel")
    # the controls show the server's defaults (this server's own, not the library's)
    assert drv.find_element("id", "temperature").get_attribute("value") == "0.6"
    assert drv.find_element("id", "max-tokens").get_attribute("value") == "24"
    drv.refresh()  # the same tab: not asked again, and the key is in no URL
    wait_for(lambda: "parameters" in drv.find_element("id", "model-line").text, what="the model line")
    assert not visible(drv, "#key-panel") and KEY not in drv.current_url
    assert drv.execute_script("return sessionStorage.getItem('lmforge.apiKey')") == KEY
    set_field(drv, "max-tokens", 3)
    say(drv, "hello")
    wait_for(lambda: idle(drv) and bodies(drv, "assistant") == ["the the the"], what="the reply")
    sent = drv.execute_script("return window.__sent;")
    assert {s["auth"] for s in sent} == {f"Bearer {KEY}"}  # every request carried the key


def test_a_reply_streams_in_and_stop_ends_the_generation_on_the_server(browser, server):
    drv = open_page(browser, server)
    set_field(drv, "max-tokens", 8000)
    say(drv, "tell me everything")
    lengths = []  # the reply's length, sampled while it streams
    while len(lengths) < 200 and (not lengths or lengths[-1] < 1200):
        lengths.append(len((bodies(drv, "assistant") or [""])[0]))
        time.sleep(0.01)
    growth = sorted(set(lengths))
    assert len(growth) >= 4 and lengths == sorted(lengths), lengths  # the text grew, piece by piece
    assert visible(drv, "#stop") and generating(server) == 1  # the server is generating now
    drv.find_element("id", "stop").click()
    t0 = time.time()
    wait_for(lambda: generating(server) == 0, timeout=3, what="the server to stop generating")
    stopped_in = time.time() - t0
    wait_for(lambda: idle(drv), what="the page to be idle")
    text = bodies(drv, "assistant")[0]
    time.sleep(0.5)
    assert bodies(drv, "assistant")[0] == text  # nothing more arrives
    assert len(text) < 8000 * len(ENDLESS_WORD) / 2, "the reply ran (nearly) to its end: nothing was stopped"
    assert drv.find_element("css selector", ".msg.assistant .foot").text == "stopped"
    # the model is free at once: a short reply comes straight after
    set_field(drv, "max-tokens", 2)
    say(drv, "again")
    wait_for(lambda: idle(drv) and len(bodies(drv, "assistant")) == 2, what="the next reply")
    assert bodies(drv, "assistant")[1] == "the the" and stopped_in < 3
    # the stopped reply stays in the conversation the next request sent
    history = sent_bodies(drv)[-1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"] and history[1]["content"] == text


def test_the_conversation_system_prompt_controls_and_new_chat(browser, server):
    drv = open_page(browser, server)
    drv.find_element("id", "system").send_keys("You answer briefly.")
    set_field(drv, "temperature", "0.3")
    set_field(drv, "max-tokens", 4)
    say(drv, "first")
    wait_for(lambda: idle(drv) and len(bodies(drv, "assistant")) == 1, what="the first reply")
    say(drv, "second")
    wait_for(lambda: idle(drv) and len(bodies(drv, "assistant")) == 2, what="the second reply")
    assert bodies(drv, "user") == ["first", "second"]
    assert bodies(drv, "assistant") == ["the the the the"] * 2
    foot = drv.find_elements("css selector", ".msg.assistant .foot")[-1].text
    assert foot == "4 tokens · cut at the max tokens"
    body = sent_bodies(drv)[-1]
    assert body["messages"] == [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "the the the the"},
        {"role": "user", "content": "second"},
    ]
    assert body["temperature"] == 0.3 and body["max_tokens"] == 4 and body["stream"] is True
    drv.find_element("id", "new-chat").click()
    assert bodies(drv, "user") == [] and visible(drv, "#empty")
    say(drv, "third")
    wait_for(lambda: idle(drv) and len(bodies(drv, "assistant")) == 1, what="the reply in the new chat")
    assert [m["content"] for m in sent_bodies(drv)[-1]["messages"]] == ["You answer briefly.", "third"]


def test_code_fences_are_shown_as_monospace_blocks(browser, server):
    drv = open_page(browser, server)
    set_field(drv, "max-tokens", 2)
    say_lines(drv, "look:\n```python\nprint('<b>hi</b>')\n```\nthe end")
    wait_for(lambda: idle(drv) and bodies(drv, "assistant"), what="the reply")
    msg = drv.find_element("css selector", ".msg.user .body")
    pre = msg.find_element("css selector", "pre")
    assert pre.get_attribute("data-lang") == "python"
    assert pre.find_element("css selector", "code").get_attribute("textContent") == "print('<b>hi</b>')"
    assert "monospace" in drv.execute_script("return getComputedStyle(arguments[0]).fontFamily;", pre)
    spans = [s.get_attribute("textContent") for s in msg.find_elements("css selector", ":scope > span")]
    assert spans == ["look:", "the end"]
    assert msg.find_elements("css selector", "b") == []


def test_html_in_a_message_is_shown_as_text_and_runs_nothing(browser, server):
    drv = open_page(browser, server)
    set_field(drv, "max-tokens", 2)
    payload = "<img src=x onerror=alert(1)> and <script>window.pwned=1</script>"
    say(drv, payload)
    wait_for(lambda: idle(drv) and bodies(drv, "assistant"), what="the reply")
    time.sleep(0.3)  # an <img> that failed to load would have fired onerror by now
    assert bodies(drv, "user") == [payload]
    assert drv.find_elements("css selector", "#log img, #log script") == []
    assert drv.execute_script("return typeof window.pwned;") == "undefined"
    assert drv.execute_script("return window.__alerts;") == []
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        drv.switch_to.alert.text  # noqa: B018


def test_a_refused_message_says_why_and_goes_back_into_the_box(browser, server):
    drv = open_page(browser, server)
    set_field(drv, "max-tokens", 9000)  # the real server's cap is 8000: a real 400
    say(drv, "too long a reply")
    notice = wait_for(
        lambda: visible(drv, "#notice") and drv.find_element("id", "notice").text, what="notice"
    )
    assert notice == "The server refused the request (400): max_tokens=9000 is over this server's cap of 8000"
    assert drv.find_element("id", "input").get_attribute("value") == "too long a reply"
    assert bodies(drv, "user") == [] and idle(drv)
    set_field(drv, "max-tokens", 2)
    answers = {  # what the page says for a busy server and a full context (answered by the spy)
        429: ("too many requests", "The server is busy (429): wait a moment and send again."),
        503: ("overloaded", "The server is busy (503): wait a moment and send again."),
        400: (
            "the conversation is 9000 tokens, over the context",
            "no longer fits the model's context of 8192",
        ),
    }
    for status, (message, says) in answers.items():
        drv.execute_script(
            "window.__answer = {status: arguments[0], message: arguments[1]};", status, message
        )
        drv.find_element("id", "send").click()
        wait_for(lambda says=says: says in drv.find_element("id", "notice").text, what=f"the {status} notice")
        assert drv.find_element("id", "input").get_attribute("value") == "too long a reply"
    drv.find_element("id", "send").click()  # the server answers again: the notice goes
    wait_for(lambda: idle(drv) and bodies(drv, "assistant") == ["the the"], what="the reply")
    assert not visible(drv, "#notice") and bodies(drv, "user") == ["too long a reply"]


def test_no_request_leaves_this_machine_and_the_console_stays_clean(browser, server):
    drv = browser
    drv.get_log("performance"), drv.get_log("browser")  # what earlier tests left
    open_page(drv, server)
    set_field(drv, "max-tokens", 3)
    say(drv, "hello")
    wait_for(lambda: idle(drv) and bodies(drv, "assistant"), what="the reply")
    say_lines(drv, "```\ncode\n```")
    wait_for(lambda: idle(drv) and len(bodies(drv, "assistant")) == 2, what="the second reply")
    drv.find_element("id", "new-chat").click()
    urls = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    paths = {urlparse(u).path for u in urls}
    assert {"/", "/static/chat.js", "/static/chat.css", "/v1/lmforge/info", "/v1/chat/completions"} <= paths
    assert {urlparse(u).hostname for u in urls} == {"127.0.0.1"}, urls
    errors = [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []


def test_the_page_fits_a_phone_and_a_desktop(browser, server, tmp_path):
    drv = open_page(browser, server)
    out = Path(os.environ.get("LMFORGE_WEB_SCREENSHOTS", tmp_path))
    shots = screenshots(drv, server, out, ["hello", "what is a cat?"], max_tokens=12)
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 200_000


def screenshots(drv, url: str, out: Path, messages: list[str], max_tokens: int) -> list[Path]:
    """A short conversation, then docs/web-chat.png (1280 px wide) and docs/web-chat-phone.png (390 px),
    checking at each width that nothing is wider than the window and the buttons are on screen."""
    shots = []
    for width, height, name in ((1280, 800, "web-chat.png"), (390, 844, "web-chat-phone.png")):
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500}
        drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        open_page(drv, url)
        assert drv.execute_script("return window.innerWidth;") == width
        phone = width < 760
        assert drv.find_element("id", "settings").get_attribute("open") == (None if phone else "true")
        summary = drv.find_element("css selector", "#settings summary")
        if phone:  # the settings fold away on a phone: open them, set, fold them again
            summary.click()
        set_field(drv, "max-tokens", max_tokens)
        if phone:
            summary.click()
        for i, text in enumerate(messages, 1):
            (say_lines if "\n" in text else say)(drv, text)
            wait_for(lambda i=i: idle(drv) and len(bodies(drv, "assistant")) == i, 60, "a reply")
        overflow = drv.execute_script("return document.documentElement.scrollWidth;")
        assert overflow <= width, f"the page is {overflow} px wide in a {width} px window"
        for button in ("send", "new-chat"):
            right = drv.execute_script(
                "return document.getElementById(arguments[0]).getBoundingClientRect().right;", button
            )
            assert 0 < right <= width, button
        path = out / name
        path.write_bytes(drv.get_screenshot_as_png())
        shots.append(path)
    drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return shots


if __name__ == "__main__":  # python -m tests.test_web RUN_DIR OUT_DIR: the docs' screenshots
    run_dir, out_dir = sys.argv[1:3]
    port = free_port()
    args = ["serve", "--run", run_dir, "--port", str(port), "--api-key", KEY, "--temperature", "0.7"]
    proc = start_server(args, port)
    drv = chromium()
    try:
        drv.get(f"http://127.0.0.1:{port}/")
        say_msgs = [
            "Write a function that adds two numbers.",
            "Finish this:\n```python\ndef fibonacci(n):\n```",
        ]
        print(*screenshots(drv, f"http://127.0.0.1:{port}", Path(out_dir), say_msgs, max_tokens=48))
    finally:
        drv.quit()
        stop_server(proc)
