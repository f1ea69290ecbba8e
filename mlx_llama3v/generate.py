"""``python -m mlx_llama3v.generate``: the command lives in ``generation/generate.py``.

Only for ``python -m``; in Python, ``mlx_llama3v.generate`` is the function
(``from mlx_llama3v import generate``) and the module is ``mlx_llama3v.generation.generate``.
"""

if __name__ == "__main__":
    from mlx_llama3v.generation.generate import main

    main()
