"""A free TCP port on 127.0.0.1 for the tests' local services and jax.distributed coordinators."""

import socket


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; xdist workers never collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
