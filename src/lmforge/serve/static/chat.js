// The lmforge chat page. It talks only to the server that served it, through the public API: replies
// stream from POST /v1/chat/completions (server-sent events read from fetch), the model's facts and the
// server's sampling defaults come from GET /v1/lmforge/info. The conversation lives in this page only.
//
// Text written by the user or the model reaches the page only as text nodes (textContent), never as
// markup: a reply holding "<script>" shows those characters and runs nothing.
"use strict";

const CHAT_URL = "/v1/chat/completions";
const INFO_URL = "/v1/lmforge/info";
const KEY_STORE = "lmforge.apiKey"; // sessionStorage: the key lives as long as the tab, never in the URL

const ui = {};
for (const id of [
  "model-line", "new-chat", "settings", "system", "temperature", "max-tokens", "defaults-line", "notice",
  "log", "empty", "composer", "input", "send", "stop", "key-panel", "key-form", "key-message", "key-input",
]) {
  ui[id.replace(/-(\w)/g, (_, c) => c.toUpperCase())] = document.getElementById(id);
}

const chat = {
  messages: [], // the conversation sent with every request: {role, content}
  controller: null, // the AbortController of the reply being streamed, null when idle
  info: null, // GET /v1/lmforge/info
};

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

function clearNotice() {
  ui.notice.hidden = true;
  ui.notice.textContent = "";
}

// ---- the API key ----

function askKey(message) {
  ui.keyMessage.textContent = message;
  ui.keyInput.value = "";
  ui.keyPanel.hidden = false;
  ui.keyInput.focus();
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  ui.keyPanel.hidden = true;
  loadInfo();
});

function keyRefused() {
  sessionStorage.removeItem(KEY_STORE);
  askKey("That key was refused: enter the API key the server was started with.");
}

// ---- the model's facts and the server's defaults ----

function compact(n) {
  for (const [size, unit] of [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]]) {
    if (n >= size) return (n / size).toFixed(n >= 10 * size ? 0 : 1).replace(/\.0$/, "") + unit;
  }
  return String(n);
}

async function loadInfo() {
  let res;
  try {
    res = await fetch(INFO_URL, { headers: authHeaders() });
  } catch (err) {
    showNotice("The server cannot be reached: is `lmforge serve` still running?");
    return;
  }
  if (res.status === 401) return keyRefused();
  if (!res.ok) return showNotice(await errorText(res));
  const info = (chat.info = await res.json());
  const facts = [
    info.model,
    compact(info.parameters) + " parameters",
    info.context_length + "-token context",
  ];
  if (info.training_tokens) facts.push("trained on " + compact(info.training_tokens) + " tokens");
  ui.modelLine.textContent = facts.join(" · ");
  const d = info.defaults;
  ui.temperature.value = d.temperature;
  ui.maxTokens.value = d.max_tokens;
  ui.maxTokens.max = info.max_tokens;
  ui.defaultsLine.textContent =
    `Server defaults: temperature ${d.temperature}, max tokens ${d.max_tokens} (at most ${info.max_tokens})` +
    (d.top_k ? `, top-k ${d.top_k}` : "") + (d.top_p ? `, top-p ${d.top_p}` : "") + ".";
}

// ---- rendering: plain text, with ``` fences as code blocks ----

function textSpan(text) {
  const span = document.createElement("span");
  span.textContent = text;
  return span;
}

function codeBlock(code, lang) {
  const pre = document.createElement("pre");
  if (lang) pre.dataset.lang = lang; // shown by CSS attr(), which inserts text, not markup
  const el = document.createElement("code");
  el.textContent = code.replace(/\n$/, "");
  pre.append(el);
  return pre;
}

// A fence still open (a reply being written) runs to the end of the text. The line breaks that only
// separate a block from its neighbours are left out (the block already starts a line).
function renderText(body, text) {
  const parts = [];
  const fence = /```([^\n`]*)(\n?)([\s\S]*?)(?:```|$)/g;
  const plain = (from, to) => {
    let piece = text.slice(from, to);
    if (from > 0) piece = piece.replace(/^\n/, "");
    if (to < text.length) piece = piece.replace(/\n$/, "");
    if (piece) parts.push(textSpan(piece));
  };
  let last = 0;
  let m;
  while (last < text.length && (m = fence.exec(text)) !== null) {
    plain(last, m.index);
    // "```python\n..." names its language; "```ls```" on one line is all code
    parts.push(m[2] ? codeBlock(m[3], m[1].trim()) : codeBlock(m[1] + m[3], ""));
    last = fence.lastIndex;
  }
  plain(last, text.length);
  body.replaceChildren(...parts);
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const box = document.createElement("div");
  box.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "body";
  const foot = document.createElement("div");
  foot.className = "foot";
  box.append(who, body, foot);
  ui.log.append(box);
  const view = { box, body, foot, text, pending: false };
  renderText(body, text);
  scrollDown(true);
  return view;
}

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) ui.log.scrollTop = ui.log.scrollHeight;
}

// Pieces arrive faster than the screen refreshes: draw at most once a frame.
function redrawSoon(view) {
  if (view.pending) return;
  view.pending = true;
  requestAnimationFrame(() => {
    view.pending = false;
    const follow = nearBottom();
    renderText(view.body, view.text);
    if (follow) scrollDown(true);
  });
}

// ---- sending and streaming ----

function numberOrNull(input) {
  const n = input.valueAsNumber;
  return Number.isFinite(n) ? n : null;
}

function requestBody(history) {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = { messages: messages.concat(history), stream: true, stream_options: { include_usage: true } };
  const temperature = numberOrNull(ui.temperature);
  const maxTokens = numberOrNull(ui.maxTokens);
  if (temperature !== null) body.temperature = temperature;
  if (maxTokens !== null) body.max_tokens = Math.round(maxTokens);
  return body;
}

async function errorText(res) {
  let message = "";
  try {
    const body = await res.json();
    message = (body && body.error && body.error.message) || "";
  } catch (err) {
    message = res.statusText;
  }
  if (res.status === 429 || res.status === 503) {
    return `The server is busy (${res.status}): wait a moment and send again.` + (message ? ` (${message})` : "");
  }
  if (res.status === 400 && /context/i.test(message)) {
    const size = chat.info ? ` of ${chat.info.context_length} tokens` : "";
    return `The conversation no longer fits the model's context${size}: start a new chat, send a shorter message or lower Max tokens. (${message})`;
  }
  return `The server refused the request (${res.status}): ${message || "no reason given"}`;
}

// Server-sent events: "data: {json}" lines, events separated by a blank line, "data: [DONE]" at the end.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return true;
        onData(JSON.parse(data));
      }
    }
  }
}

function setGenerating(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
}

async function send(text) {
  clearNotice();
  const history = chat.messages; // "New chat" replaces the array: a late reply lands in its own chat
  history.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.box.classList.add("streaming");
  const controller = new AbortController();
  chat.controller = controller;
  setGenerating(true);
  const end = { finish: null, usage: null, stopped: false, failed: null, done: false };
  try {
    const res = await fetch(CHAT_URL, {
      method: "POST",
      headers: authHeaders(),
      body: JSON.stringify(requestBody(history)),
      signal: controller.signal,
    });
    if (res.ok) {
      end.done = await readEvents(res, (chunk) => {
        if (chunk.error) end.failed = chunk.error.message || "the server reported an error";
        if (chunk.usage) end.usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          reply.text += choice.delta.content;
          redrawSoon(reply);
        }
        if (choice.finish_reason) end.finish = choice.finish_reason;
      });
    } else {
      end.refused = res.status;
      end.failed = res.status === 401 ? null : await errorText(res);
    }
  } catch (err) {
    if (err.name === "AbortError") end.stopped = true;
    else end.failed = "The connection to the server was lost: " + err.message;
  }
  finish(history, text, asked, reply, end);
  if (chat.controller === controller) {
    chat.controller = null;
    setGenerating(false);
  }
}

function finish(history, text, asked, reply, end) {
  reply.box.classList.remove("streaming");
  renderText(reply.body, reply.text);
  if (end.refused) {
    // Nothing was generated: take the message back into the input, to send again.
    history.pop();
    asked.box.remove();
    reply.box.remove();
    if (!ui.input.value) ui.input.value = text;
    if (end.refused === 401) keyRefused();
    else showNotice(end.failed);
    return;
  }
  if (reply.text) history.push({ role: "assistant", content: reply.text });
  const notes = [];
  if (end.usage) notes.push(end.usage.completion_tokens + " tokens");
  if (end.stopped) notes.push("stopped");
  else if (end.finish === "length") notes.push("cut at the max tokens");
  reply.foot.textContent = notes.join(" · ");
  if (end.failed) showNotice(end.failed);
  else if (!end.done && !end.stopped) showNotice("The reply ended early: the server closed the connection.");
  scrollDown(false);
}

function newChat() {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  clearNotice();
  ui.input.focus();
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.replace(/\s+$/, "");
  if (!text.trim() || chat.controller) return;
  ui.input.value = "";
  send(text);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

// Aborting the fetch closes the connection; the server ends the generation at its next token.
ui.stop.addEventListener("click", () => chat.controller && chat.controller.abort());
ui.newChat.addEventListener("click", newChat);

if (window.matchMedia("(min-width: 760px)").matches) ui.settings.open = true;
if (document.body.dataset.keyRequired === "1" && !sessionStorage.getItem(KEY_STORE)) {
  askKey("This server needs its API key. It is kept in this tab only (sessionStorage).");
} else {
  loadInfo();
}
