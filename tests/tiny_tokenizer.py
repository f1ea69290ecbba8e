"""The tiny Llama-3-style tokenizer of the tests: ``examples/shapes/tiny_tokenizer.py``.

It lives beside the shapes demo, which builds its model on it; the tests, the
benchmarks and the demo share that one file (it is not part of the package).
"""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "examples" / "shapes" / "tiny_tokenizer.py"
_spec = importlib.util.spec_from_file_location("_shapes_tiny_tokenizer", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
