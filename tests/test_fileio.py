"""fileio.hold: the barrier the trainer's `pause_after_step` and the evaluator's `pause_after` wait
at (their kill and terminate tests: train/test_train.py, eval/test_run.py, test_fileio_gcs.py)."""

import threading

from qwenvl_jax import fileio


def test_hold_waits_until_the_file_is_deleted(tmp_path):
    path = tmp_path / "held"
    polls = threading.Semaphore(0)
    seen = []

    def release():
        # Three polls while the file is there: the holder is waiting; then the file goes.
        seen.append(all(polls.acquire(timeout=30) for _ in range(3)))
        seen.append(path.read_text())
        path.unlink()

    t = threading.Thread(target=release)
    t.start()
    assert fileio.hold(str(path), "5\n", stop=lambda: polls.release() or False) is False
    t.join()
    assert seen == [True, "5\n"]


def test_hold_ends_on_stop_and_removes_its_file(tmp_path):
    path = tmp_path / "held"
    calls = []

    def stop():
        calls.append(path.exists())
        return len(calls) == 3  # the flag a SIGTERM handler sets, seen on the third poll

    assert fileio.hold(str(path), "2\n", stop=stop) is True
    assert calls == [True, True, True] and not path.exists()
