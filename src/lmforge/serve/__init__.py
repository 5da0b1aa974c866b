"""`lmforge serve`: an OpenAI-compatible HTTP server for a run (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from ..errors import LmforgeError
from ..generate.params import SamplingParams

API_KEY_ENV = "LMFORGE_API_KEY"


class ServeError(LmforgeError, RuntimeError):
    """The server cannot start (a missing package, a bad setting)."""


def serve(
    run: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens: int = 512,
    max_body: int = 1_000_000,
    model_name: str | None = None,
    device: str = "auto",
    console=None,
    quantize: str | None = None,
    sampling: SamplingParams | None = None,
    api_key: str | None = None,
    insecure: bool = False,
    max_rows: int = 8,
    max_queue: int = 64,
    timeout: float = 600.0,
) -> None:
    """Load the run and serve it until stopped (Ctrl-C); sampling: a request's defaults (SamplingParams).

    api_key (else $LMFORGE_API_KEY): required as `Authorization: Bearer KEY` on /v1. A host other than
    loopback needs a key, or insecure=True.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    try:
        import uvicorn  # noqa: F401 - missing, it is said here (run_server uses it)

        from .app import create_app
    except ImportError as e:
        raise ServeError(
            f"serving needs FastAPI and uvicorn ({e.name} is missing): pip install 'lmforge[serve]'"
        ) from e
    _check_limits(max_tokens, max_body, max_rows, max_queue, timeout, port)
    _check_address(host, port)
    check_exposure(host, api_key, insecure)
    llm = _load_for_decode_thread(run, device, quantize, max_rows, max_queue)
    app = create_app(
        llm,
        max_tokens,
        max_body,
        model_name,
        sampling or SamplingParams(),
        api_key,
        max_rows,
        max_queue,
        timeout,
    )
    if console is not None:
        base = f"http://{host}:{port}"
        console.print(
            f"serving {llm.name}{' (API key required)' if api_key else ''}; Ctrl-C stops\n"
            f"  chat page:  {base}/\n  OpenAI API: {base}/v1",
            highlight=False,
            soft_wrap=True,
        )
    run_server(app, host, port, llm.scheduler())


# On SIGTERM (or Ctrl-C) requests still waiting for a row are answered 503 at once, generations under
# way get DRAIN_S to finish and are then ended (a stream with an error event and [DONE], others a 503),
# and uvicorn, which cancels what is still open GRACE_S after the signal, finds nothing left to cut: no
# request is dropped or answered with a 500, and the server is gone within a few seconds.
DRAIN_S = 2.0
GRACE_S = 3.0


def run_server(app, host: str, port: int, scheduler) -> None:
    """Serve app with uvicorn until SIGTERM or Ctrl-C, draining the batcher first (see DRAIN_S)."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            scheduler.refuse_waiting()
            stop = asyncio.get_running_loop().call_later(DRAIN_S, scheduler.close)
            try:
                await super().shutdown(sockets)
            finally:
                stop.cancel()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S)
    DrainingServer(config).run()


def _check_limits(max_tokens: int, max_body: int, max_rows: int, max_queue: int, timeout: float, port: int):
    """One line naming the setting out of range, before anything loads."""
    if max_tokens < 1 or max_body < 1:
        raise ServeError(f"--max-tokens={max_tokens} and --max-body={max_body} must both be >= 1")
    if max_rows < 1 or max_queue < 0 or not timeout > 0:
        raise ServeError(
            f"--max-rows={max_rows} must be >= 1, --max-queue={max_queue} >= 0 and --timeout={timeout} > 0"
        )
    if not 0 <= port <= 65535:
        raise ServeError(f"--port={port}: must be in 0..65535")


def _load_for_decode_thread(run, device: str, quantize: str | None, max_rows: int, max_queue: int):
    """The LLM, loaded so that its batcher's thread gets the CPU's cores to itself.

    All of the server's model work runs on the batcher's thread. GNU OpenMP keeps a team of worker
    threads for every thread that has run a parallel op; a second team on the same cores makes both
    teams' workers sleep between ops instead of spinning, and a batched decode step took 1.8x as long
    (8 rows of the bench model on 2 cores: 14.7 ms on a second thread against 8.2 ms on the first).
    `LLM.load` and the batcher's set-up already start no team on this thread (`one_intra_op_thread`);
    this thread, which goes on to run the event loop, also keeps one intra-op thread for good, so nothing
    it runs later starts one, and the batcher's thread takes them all.
    """
    import torch

    from ..api import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM.load(run, device=device, quantize=quantize)
    llm.scheduler(max_rows, max_queue, threads=threads)
    return llm


def _check_address(host: str, port: int) -> None:
    """Fail in one line, before loading the model, when host:port cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise ServeError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host"
        ) from e


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse, in one line, to serve beyond this machine without a key (unless insecure is asked for)."""
    if api_key or insecure or _loopback_only(host):
        return
    raise ServeError(
        f"--host {host} lets other machines reach the server, and no API key is set: pass --api-key KEY "
        f"(or set {API_KEY_ENV}), or --insecure to serve without one"
    )


def _loopback_only(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
    except (OSError, ValueError):
        return False
