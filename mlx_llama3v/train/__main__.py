"""``python -m mlx_llama3v.train``."""

from .cli import main

main()
