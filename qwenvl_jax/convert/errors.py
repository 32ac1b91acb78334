"""The conversion errors: a checkpoint (or its config) that cannot be used, said in the message.

Every one is a `CheckpointError`, so a caller (the command line) can tell a bad checkpoint from a
bug; each message names the file, key or tensor. They are ValueErrors for older callers.
"""


class CheckpointError(ValueError):
    """A checkpoint, or its config.json, that cannot be converted (the message says why)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the config."""


class TensorFileError(CheckpointError):
    """A checkpoint file is malformed or holds something other than a state dict."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor in a checkpoint file has a dtype other than float32 / bfloat16 / float16."""
