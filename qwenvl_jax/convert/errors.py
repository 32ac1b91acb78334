"""The conversion errors: a checkpoint (or its config) that cannot be used, said in the message.

Each is a `qwenvl_jax.errors.UserError` (a command line prints it as one line, exit code 2) and a
ValueError (what a library caller catches); each message names the file, key or tensor. A path that
does not exist raises `qwenvl_jax.errors.MissingPathError` (a FileNotFoundError).
`CheckpointError` itself lives in `qwenvl_jax.errors`: `qwenvl_jax.checkpoint`, below the
converters, raises it too. A parameter tree (ours, not a file's state dict) that does not fit the
model raises `qwenvl_jax.tree.TreeMismatchError`, also a CheckpointError.
"""

from qwenvl_jax.errors import CheckpointError, MissingPathError


class StateDictMismatchError(CheckpointError):
    """A weight file's state dict (HF or OpenCLIP keys) does not match the config.

    A key the config needs is missing or mis-shaped, or one is unexpected or appears twice. Our own
    parameter tree that does not fit a model raises `qwenvl_jax.tree.TreeMismatchError` instead.
    """


class TensorFileError(CheckpointError):
    """A checkpoint file is malformed or holds something other than a state dict."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor in a checkpoint file has a dtype other than float32 / bfloat16 / float16."""


class NotACheckpointError(MissingPathError):
    """An existing directory that holds no checkpoint of any kind we read (the message lists it)."""


__all__ = [
    "CheckpointError",
    "NotACheckpointError",
    "StateDictMismatchError",
    "TensorFileError",
    "UnsupportedDtypeError",
]
