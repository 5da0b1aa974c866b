"""`lmforge serve` under load: throughput of concurrent streams, time to first token, a soak with
disconnects, and a burst far past the server's rows — all bounded, all on 127.0.0.1.

    PYTHONPATH=src python benchmarks/serve.py                 # a random-weight bench model, all phases
    PYTHONPATH=src python benchmarks/serve.py --run runs/quickstart --soak 60 --burst 200

Phases (each prints one line):
  alone     one streaming client, `--requests` requests one after another: tokens/s, median TTFT
  together  `--clients` streaming clients at once, `--requests` each: aggregate tokens/s (and its ratio to
            alone), median TTFT under load (and its ratio to idle); with `--spread` the requests' lengths
            vary, so the clients stop arriving in waves; with `--unique` every prompt ends differently
            (otherwise all are the same, and the server reuses their cached start); with `--think MS` each
            client waits a random 0..MS ms before each request, so requests arrive at any point of a
            decode step, not just after one began (a client that sends its next request the moment its
            last reply ends arrives just after the step that ended it started the next). `--rounds`
            repeats the pair and gives the ratios' medians (a shared machine's speed can drift)
  soak      `--soak` seconds of clients that leave mid-stream at random: the server's resident memory
            after vs idle, and /health
  burst     `--burst` streaming requests at once: how many streamed, how many got 429, the longest
            /health answer during the burst; then SIGTERM and the seconds until the server exited
Tokens are counted by the server (stream_options.include_usage), so an early end-of-text counts right.
Each client keeps its connection open from one request to the next, as the official clients' pools do
(`--new-connections`: a new one per request); a client that leaves mid-stream closes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import yaml

from lmforge.checkpoint import model_state, save_checkpoint
from lmforge.config import Config
from lmforge.config_io import config_to_dict
from lmforge.data.stdlib_corpus import iter_stdlib
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import GPT, ModelConfig
from lmforge.presets import BENCH_MODEL

PROMPT = "def main(args):\n    "


def bench_run(root: Path) -> Path:
    """A run directory holding the bench model with random weights and a BPE tokenizer of its vocabulary."""
    texts = [doc.text for _, doc in zip(range(200), iter_stdlib(None), strict=False)]
    tok = train_tokenizer(texts, "bpe", BENCH_MODEL["vocab_size"])
    cfg = Config(model=ModelConfig(**{**BENCH_MODEL, "vocab_size": tok.vocab_size}), out=str(root / "run"))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    out = root / "run"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tok.save(out / "tokenizer.json")
    save_checkpoint(out, 0, model_state(model), {}, {"config": config_to_dict(cfg), "tokens": 0})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    """One client's HTTP/1.1 connection to the server, kept open from one request to the next as the
    official clients' connection pools keep theirs (keep_alive=False: a new connection per request).

    A minimal client on asyncio's streams: the clients share the machine's cores with the server, so
    they should take as little of them as they can (httpx took 2.5x this client's CPU time per streamed
    piece). Only the line with the usage is parsed as JSON."""

    def __init__(self, url: str, keep_alive: bool = True) -> None:
        self.host, self.port = url.removeprefix("http://").split(":")
        self.keep_alive = keep_alive
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def stream(self, max_tokens: int, leave_after: int | None = None, tag: str = ""):
        """One streaming chat request: (seconds to the first piece, completion tokens, status); leave_after:
        disconnect after that many pieces (status "left")."""
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": PROMPT + tag}],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        close = "" if self.keep_alive else "Connection: close\r\n"
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{close}\r\n"
        ).encode()
        start = time.perf_counter()
        status_line = b""
        for _ in range(2):  # a kept connection the server has closed meanwhile: open a new one
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
            self.writer.write(head + body)
            status_line = await self.reader.readline()
            if status_line:
                break
            self.close()
        try:
            result = await self._read(int(status_line.split()[1]), start, leave_after)
        except BaseException:
            self.close()
            raise
        if not self.keep_alive or result[2] != 200:
            self.close()
        return result

    async def _read(self, status: int, start: float, leave_after: int | None):
        first, tokens, pieces = None, 0, 0
        while (await self.reader.readline()).strip():  # headers (a stream is chunked)
            pass
        if status != 200:
            return None, 0, status
        while size := int((await self.reader.readline()).strip() or b"0", 16):
            data = await self.reader.readexactly(size + 2)  # the chunk's events, and its CRLF
            for line in data.split(b"\n"):
                if not line.startswith(b"data: {"):
                    continue
                if b'"delta": {"content": "' in line:  # a piece (the first chunk's delta has the role)
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - start
                elif b'"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            if leave_after is not None and pieces >= leave_after:
                self.close()
                return first, 0, "left"
        await self.reader.readline()  # the empty line after the last chunk
        return first, tokens, 200


async def clients_phase(
    url: str,
    clients: int,
    requests: int,
    max_tokens: int,
    spread: float = 0.0,
    unique: bool = False,
    keep_alive: bool = True,
    think: float = 0.0,
) -> tuple[float, float]:
    """`clients` concurrent clients doing `requests` streams each: (aggregate tokens/s, median TTFT).
    spread: the requests ask for lengths evenly spaced over max_tokens x (1 +- spread), each client the
    same ones in a rotated order: every client asks for as many tokens in all (none idles at the end),
    but they no longer finish, and come back, in step with each other. unique: every request's message
    ends differently (its client and number), so only the prompt's start is shared, as a system prompt
    is; otherwise all prompts are the same, and the server may reuse all but their last token.
    keep_alive: each client keeps its connection from one request to the next. think: each client waits a
    random 0..think seconds before each request (seeded per client; not counted in its TTFT)."""
    ttfts, total = [], 0
    lengths = [
        round(max_tokens * (1 - spread + 2 * spread * i / max(1, requests - 1))) for i in range(requests)
    ]

    async def one_client(k: int):
        nonlocal total
        client = Client(url, keep_alive)
        pause = random.Random(k)
        for r, n in enumerate(lengths[k % requests :] + lengths[: k % requests]):
            if think:
                await asyncio.sleep(pause.uniform(0, think))
            first, tokens, _ = await client.stream(max(1, n), tag=f" # {k}.{r}" if unique else "")
            total += tokens
            if first is not None:
                ttfts.append(first)
        client.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    elapsed = time.perf_counter() - start
    return total / elapsed, statistics.median(ttfts)


async def soak(url: str, seconds: float, clients: int, max_tokens: int, seed: int = 0) -> int:
    """Clients that stream and leave at random for `seconds`; the number of requests made."""
    rng, made = random.Random(seed), 0
    deadline = time.monotonic() + seconds

    async def one_client():
        nonlocal made
        client = Client(url)
        while time.monotonic() < deadline:
            leave = rng.choice([None, 1, 3, 10])  # leaving closes the connection
            await client.stream(max_tokens, leave_after=leave)
            made += 1
        client.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return made


async def burst(url: str, n: int, max_tokens: int) -> tuple[dict, float]:
    """n concurrent streams, a third of them leaving early, and /health polled throughout: (outcome
    counts, the slowest /health answer in seconds)."""
    outcomes: dict = {}
    slowest = 0.0
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one(i):
            client = Client(url, keep_alive=False)
            _, _, status = await client.stream(max_tokens, leave_after=2 if i % 3 == 0 else None)
            outcomes[status] = outcomes.get(status, 0) + 1

        async def watch():
            nonlocal slowest
            while not done.is_set():
                t = time.perf_counter()
                (await client.get(url + "/health", timeout=30)).raise_for_status()
                slowest = max(slowest, time.perf_counter() - t)
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(one(i) for i in range(n)))
        done.set()
        await watcher
    return outcomes, slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="RUN_DIR to serve (default: the bench model with random weights)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="streams per client in alone/together")
    ap.add_argument(
        "--rounds", type=int, default=1, help="alone/together pairs; the ratios' medians are kept"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--spread", type=float, default=0.0, help="requests ask for max_tokens x (1 +- spread) (0: all alike)"
    )
    ap.add_argument("--unique", action="store_true", help="every request's prompt ends differently")
    ap.add_argument("--think", type=float, default=0.0, help="ms each client may wait before a request")
    ap.add_argument(
        "--new-connections",
        action="store_true",
        help="a new connection for every request (default: each client keeps its connection open)",
    )
    ap.add_argument("--soak", type=float, default=60.0, help="seconds of the soak (0: skip)")
    ap.add_argument("--burst", type=int, default=200, help="requests in the burst (0: skip)")
    ap.add_argument("--serve-args", default="", help="extra flags for lmforge serve")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else bench_run(Path(tmp.name))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmforge", "serve", "--run", str(run), "--port", str(port)]
    server = subprocess.Popen(cmd + args.serve_args.split(), stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        print(
            f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        )
        asyncio.run(clients_phase(url, 1, 1, 8))  # warm-up
        idle_rss = rss_mb(server.pid)
        ratios, slowdowns = [], []
        keep, think = not args.new_connections, args.think / 1e3
        for _ in range(args.rounds):  # alone and together back to back: the machine's drift cancels out
            alone_tps, alone_ttft = asyncio.run(
                clients_phase(url, 1, args.requests, args.max_tokens, args.spread, args.unique, keep, think)
            )
            print(f"alone     {alone_tps:7.1f} tok/s   TTFT median {alone_ttft * 1e3:6.0f} ms")
            tps, ttft = asyncio.run(
                clients_phase(
                    url, args.clients, args.requests, args.max_tokens, args.spread, args.unique, keep, think
                )
            )
            ratios.append(tps / alone_tps)
            slowdowns.append(ttft / alone_ttft)
            print(
                f"together  {tps:7.1f} tok/s ({tps / alone_tps:.2f}x alone, {args.clients} clients)   "
                f"TTFT median {ttft * 1e3:6.0f} ms ({ttft / alone_ttft:.2f}x idle)"
            )
        if args.rounds > 1:
            print(
                f"median    {statistics.median(ratios):.2f}x alone, TTFT {statistics.median(slowdowns):.2f}x "
                f"idle over {args.rounds} rounds"
            )
        if args.soak:
            warm_rss = rss_mb(server.pid)
            made = asyncio.run(soak(url, args.soak, args.clients, args.max_tokens))
            time.sleep(2)
            health = httpx.get(url + "/health", timeout=10).status_code
            after = rss_mb(server.pid)
            print(
                f"soak      {made} requests in {args.soak:.0f} s with random disconnects; RSS idle "
                f"{idle_rss:.0f} MiB (after the phases above {warm_rss:.0f}), after {after:.0f} MiB "
                f"({after / idle_rss - 1:+.1%}); /health {health}"
            )
        if args.burst:
            outcomes, slowest = asyncio.run(burst(url, args.burst, 16))
            print(f"burst     {args.burst} streams: {outcomes}; slowest /health {slowest:.2f} s")
    finally:
        start = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
            print(f"SIGTERM   exited in {time.perf_counter() - start:.2f} s")
        except subprocess.TimeoutExpired:
            server.kill()
            print("SIGTERM   did not stop the server within 30 s (killed)")
        tmp.cleanup()


if __name__ == "__main__":
    main()
