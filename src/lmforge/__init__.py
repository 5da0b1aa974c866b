"""lmforge: train GPT-style language models from scratch and put them to use."""

__version__ = "0.1.0"

__all__ = ["LLM"]


def __getattr__(name: str):
    # `import lmforge` stays light (no torch): the API is imported on first use of lmforge.LLM.
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
