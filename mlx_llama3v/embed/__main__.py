"""``python -m mlx_llama3v.embed``."""

from .cli import main

main()
