"""``mlx_llama3v.chat``: ``ChatSession`` and the command, which live in ``generation/chat.py``."""

from .generation.chat import ChatSession, app, main

__all__ = ["ChatSession", "app", "main"]

if __name__ == "__main__":
    main()
