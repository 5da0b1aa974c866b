"""lmforge: train GPT-style language models from scratch and put them to use."""

__version__ = "0.1.0"
