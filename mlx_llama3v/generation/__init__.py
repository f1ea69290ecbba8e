"""Generation and chat: everything around mlx-lm's decoding loop, in one room.

- ``generate``: ``stream_generate`` / ``generate`` and the ``mlx_llama3v.generate`` command.
- ``chat``: ``ChatSession`` and the ``mlx_llama3v.chat`` loop.
- ``sampling``: ``GenerationOptions``, every generation option defined and validated once
  (the commands, the Python API and a server share it).
- ``features``: image features by tile content hash, so a follow-up question about the
  same image does not run the vision tower again.
- ``prompt_cache``: the language model's KV cache plus what it holds, so the turns of a
  conversation prefill only their new tokens.
- ``text``: the tokenizer as mlx-lm's ``TokenizerWrapper`` (end tokens, streaming
  detokenizer) and user stop strings.
- ``cli``: the options and model loading the two commands share.

The public API is ``mlx_llama3v.generate`` / ``mlx_llama3v.stream_generate`` (the
functions) and ``mlx_llama3v.chat.ChatSession``.
"""
