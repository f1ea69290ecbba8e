"""The tests' tiny tokenizer lives in the package (the shapes demo builds on it too)."""

from mlx_llama3v.tiny_tokenizer import *  # noqa: F401,F403
