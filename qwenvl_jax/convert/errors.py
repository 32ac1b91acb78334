"""The conversion errors: a checkpoint (or its config) that cannot be used, said in the message.

Each is a `qwenvl_jax.errors.UserError` (a command line prints it as one line, exit code 2) and a
ValueError (what a library caller catches); each message names the file, key or tensor. A path that
does not exist raises `qwenvl_jax.errors.MissingPathError` (a FileNotFoundError).
"""

from qwenvl_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint, or its config.json, that cannot be converted (the message says why)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the config."""


class TensorFileError(CheckpointError):
    """A checkpoint file is malformed or holds something other than a state dict."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor in a checkpoint file has a dtype other than float32 / bfloat16 / float16."""
