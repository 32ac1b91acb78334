"""qwenvl_jax: Qwen-VL in JAX/Flax.

Public API: `QwenVL` (load, chat, generate, export) and the config presets.
"""

from qwenvl_jax.config import QWenConfig, VisualConfig, get_preset

__all__ = ["QWenConfig", "VisualConfig", "get_preset", "QwenVL"]


def __getattr__(name):
    # The inference API pulls in the model and tokenizer; import it only when asked for.
    if name == "QwenVL":
        from qwenvl_jax.api import QwenVL

        return QwenVL
    raise AttributeError(name)
