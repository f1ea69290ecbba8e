"""``python -m mlx_llama3v.convert``."""

from .cli import main

main()
