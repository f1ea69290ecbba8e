"""``python -m mlx_llama3v.server``."""

from .cli import main

if __name__ == "__main__":
    main()
