"""The parts of generation that sit around mlx-lm's decoding loop.

- ``features``: image features by tile content hash, so a follow-up question about the
  same image does not run the vision tower again.
- ``prompt_cache``: the language model's KV cache plus what it holds, so the turns of a
  conversation prefill only their new tokens.
- ``text``: the tokenizer as mlx-lm's ``TokenizerWrapper`` (end tokens, streaming
  detokenizer) and user stop strings.
- ``cli``: what the ``generate`` and ``chat`` commands share (options, one-line errors).

The public API is ``mlx_llama3v.generate`` (``generate``, ``stream_generate``) and
``mlx_llama3v.chat`` (``ChatSession``).
"""
