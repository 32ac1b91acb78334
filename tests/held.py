"""Waiting for a child process to reach a state it then holds (the tests' barrier, not a race).

The trainer (`config.pause_after_step`) and the evaluator (`pause_after`) stop at a named point
and wait while a file exists; a test waits for that file, then kills or signals the child, which
cannot have moved on in between.
"""

import time


def why(text: str, n: int = 3000) -> str:
    """The part of a child's stderr that says why it ended: its last Python traceback when it
    printed one (a native abort at exit prints pages after it), and always its last lines."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    i = text.rfind("Traceback (most recent call last)")
    tail = text[-n:]
    if i < 0 or i >= len(text) - n:
        return tail
    return text[i : i + n] + "\n[...]\n" + tail[-1000:]


def wait_until(cond, procs, what: str, timeout: float = 300.0, log=None) -> None:
    """Polls `cond()` until it is true; fails at once if one of `procs` exits first (with its
    stderr: a pipe, or `log`, the file it writes to) and after `timeout` seconds (a child that
    never gets there)."""
    deadline = time.time() + timeout
    while not cond():
        for p in procs:
            if p.poll() is not None:
                if log is not None:
                    log.seek(0)
                    text = log.read()
                else:
                    err = p.communicate()[1] if p.stderr is not None else b""
                    text = (err or b"").decode(errors="replace")
                raise AssertionError(f"exited {p.returncode} before {what}:\n{why(text)}")
        if time.time() > deadline:
            raise AssertionError(f"not {what} after {timeout:.0f} s")
        time.sleep(0.05)
