"""``python -m mlx_llama3v SUBCOMMAND ...``."""

from .cli import main

main()
