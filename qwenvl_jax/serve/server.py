"""Load a checkpoint, start the engine, serve the app with uvicorn (what `python -m
qwenvl_jax.serve` runs), and a server in a background thread for notebooks and tests.

SIGTERM (or Ctrl-C): uvicorn closes the listening socket at once (no new requests), lets the
running requests finish for `shutdown_grace_s`, then cancels what is left (a cancelled request
frees its slot); the engine is shut down last.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from qwenvl_jax.serve.app import ServerConfig, create_app
from qwenvl_jax.serve.images import ImageLimits

log = logging.getLogger(__name__)


def build(
    checkpoint: str,
    *,
    mesh: str | None = None,
    quantize: str | None = None,
    dtype: str | None = None,
    max_batch: int = 8,
    max_seq_len: int = 2048,
    max_queue: int = 256,
    image_cache_mb: float = 256.0,
    prefill_chunk: int = 512,
    prefix_cache_mb: float = 256.0,
    decode_steps: int | None = None,
    allowed_local_dir: str | None = None,
    served_model_name: str | None = None,
    max_images: int = 8,
):
    """(engine, app): the model loaded as `QwenVL.from_pretrained` loads it, the engine started
    (warmed up), the app over it. decode_steps None: the engine's default."""
    from qwenvl_jax import QwenVL
    from qwenvl_jax.serve.engine import Engine

    model = QwenVL.from_pretrained(checkpoint, dtype, mesh=mesh, quantize=quantize)
    engine = Engine(
        model,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        max_queue=max_queue,
        image_cache_mb=image_cache_mb,
        prefill_chunk=prefill_chunk,
        prefix_cache_mb=prefix_cache_mb,
        **({} if decode_steps is None else {"decode_steps": decode_steps}),
    )
    engine.start()
    name = served_model_name or os.path.basename(os.path.normpath(checkpoint))
    limits = ImageLimits(allowed_local_dir=allowed_local_dir)
    config = ServerConfig(name, max_seq_len, limits=limits, max_images=max_images)
    return engine, create_app(engine, config)


def serve(host: str = "127.0.0.1", port: int = 8000, shutdown_grace_s: float = 30.0, **kw) -> None:
    """`build(**kw)` then serve until SIGTERM/SIGINT (see the module docstring)."""
    import uvicorn

    engine, app = build(**kw)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_grace_s
    )
    # uvicorn restores the handlers it found and re-raises a caught SIGTERM/SIGINT after its
    # graceful shutdown; these no-ops make that a normal return (engine shut down, exit 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.shutdown(grace_s=1.0)  # uvicorn already waited shutdown_grace_s for the requests


class BackgroundServer:
    """uvicorn serving `app` on a thread of this process (notebooks, tests):
    `server = BackgroundServer(app, port=8000).start()`, later `server.stop()`."""

    def __init__(
        self, app, host: str = "127.0.0.1", port: int = 8000, shutdown_grace_s: float = 30.0
    ):
        import uvicorn

        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=shutdown_grace_s,
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """What SIGTERM does to `python -m qwenvl_jax.serve`: stop listening, let the running
        requests finish (cancelled past shutdown_grace_s), return when the server is down."""
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout=timeout_s)
