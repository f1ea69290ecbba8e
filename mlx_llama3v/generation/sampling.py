"""Generation options, defined once: ``GenerationOptions`` and its command-line flags.

Every option of ``stream_generate`` / ``generate`` / ``ChatSession`` and of the ``generate``
and ``chat`` commands (a server can take the same) is a field here, with its flag, help
and check. Making a ``GenerationOptions`` validates it: a value that makes no sense
(``temp=-1``, ``top_p=2``, NaN...) raises ``OptionError`` naming the option, as the
keyword (``temp``) from Python and as the flag (``--temp``) on the command line.

``with_generation_options`` adds one typer option per field to a command, which then
receives them as one ``options: GenerationOptions`` argument.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Callable, Dict, List, Optional, get_type_hints

from ..errors import UserError

# mlx-lm's generate_step defaults (mlx_lm.generate.DEFAULT_*), restated so this module
# imports neither mlx nor mlx-lm: a server or a CLI can validate before loading them
DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_STEP_SIZE = 2048
DEFAULT_QUANTIZED_KV_START = 5000
KV_BITS = (2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)

SAMPLING_HELP = (
    "Published sampling of MiniCPM-Llama3-V 2.5: --temp 0.7 --top-p 0.8 --top-k 100 "
    "--repetition-penalty 1.05."
)


class OptionError(UserError, ValueError):
    """An option value that makes no sense; ``template`` names options as ``{0}``, ``{1}``."""

    def __init__(self, template: str, *names: str):
        self.template, self.names = template, names
        super().__init__(template.format(*names))

    def as_flags(self) -> "OptionError":
        """The same error with the options named by their command-line flags."""
        error = OptionError(self.template, *self.names)
        error.args = (self.template.format(*(flag(n) for n in self.names)),)
        return error


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _option(default, help: str, check: Optional[Callable[[Any], Optional[str]]] = None, short=None):
    """A field with its command-line help, optional short flag and check (-> problem or None)."""
    return field(default=default, metadata={"help": help, "check": check, "short": short})


def _number(low=None, high=None, *, low_open=False, integer=False, none=False):
    """A check: a finite number within [low, high] (``low_open``: above low)."""

    def check(value):
        if value is None:
            return None if none else "must be given"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number; got {value!r}"
        if integer and value != int(value):
            return f"must be a whole number; got {value}"
        if not math.isfinite(value):
            return f"must be a finite number; got {value}"
        if low is not None and (value <= low if low_open else value < low):
            bound = f"above {low}" if low_open else f"at least {low}"
            return f"must be {bound}" + (f" and at most {high}" if high is not None else "") + f"; got {value}"
        if high is not None and value > high:
            return f"must be at most {high}; got {value}"
        return None

    return check


def _one_of(choices, none=False):
    def check(value):
        if value is None and none:
            return None
        if value not in choices:
            return f"must be one of {', '.join(map(str, choices))}; got {value}"
        return None

    return check


def _max_tokens(value):
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
        return f"must be positive, or -1 for no limit; got {value}"
    return None


@dataclass
class GenerationOptions:
    """How to generate: length, sampling, stop strings, KV cache and prefill."""

    max_tokens: int = _option(
        DEFAULT_MAX_TOKENS, "Most tokens to generate per answer (-1: up to the context length).",
        _max_tokens, short="-m",
    )
    temp: float = _option(0.0, "Sampling temperature; 0 is greedy.", _number(0))
    top_p: float = _option(
        1.0, "Nucleus sampling: keep the most likely tokens up to this probability (1: off).",
        _number(0, 1, low_open=True),
    )
    top_k: int = _option(0, "Sample among the k most likely tokens (0: off).", _number(0, integer=True))
    min_p: float = _option(
        0.0, "Drop tokens below this fraction of the top token's probability (0: off).", _number(0, 1)
    )
    repetition_penalty: Optional[float] = _option(
        None, "Penalty for repeating recent tokens (1.0: off).", _number(0, low_open=True, none=True)
    )
    repetition_context_size: int = _option(
        20, "How many recent tokens the repetition penalty looks at.", _number(1, integer=True)
    )
    seed: Optional[int] = _option(None, "Random seed for sampling.", _number(0, integer=True, none=True))
    stop: Optional[List[str]] = _option(
        None, "Stop when the text contains this string (not printed); repeatable."
    )
    kv_bits: Optional[int] = _option(
        None, "Quantize the KV cache to this many bits (2-8), from --quantized-kv-start tokens on.",
        _one_of(KV_BITS, none=True),
    )
    kv_group_size: int = _option(64, "Group size of the KV cache quantization.", _one_of(KV_GROUP_SIZES))
    quantized_kv_start: int = _option(
        DEFAULT_QUANTIZED_KV_START, "Cache length at which --kv-bits quantization starts.",
        _number(0, integer=True),
    )
    max_kv_size: Optional[int] = _option(
        None, "Keep at most this many tokens in the KV cache (rotating).",
        _number(1, integer=True, none=True),
    )
    prefill_step_size: int = _option(
        DEFAULT_PREFILL_STEP_SIZE, "Prompt tokens per prefill step.", _number(1, integer=True)
    )

    def __post_init__(self):
        for f in fields(self):
            check = f.metadata["check"]
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise OptionError("{0} " + problem, f.name)
        if self.stop is not None and (
            isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop)
        ):
            raise OptionError("{0} must be a list of non-empty strings; got %r" % (self.stop,), "stop")
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise OptionError(
                "{0} cannot be combined with {1} (a rotating KV cache cannot be quantized)",
                "kv_bits",
                "max_kv_size",
            )

    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> "GenerationOptions":
        """Options from keyword arguments; an unknown keyword is a TypeError."""
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    def replace(self, **changes) -> "GenerationOptions":
        return self.from_kwargs({**asdict(self), **changes})


def with_generation_options(command: Callable) -> Callable:
    """Give a typer command one option per ``GenerationOptions`` field.

    The command declares ``options: GenerationOptions`` (not a command-line option) and
    receives the validated options there; a bad value is an ``OptionError`` naming the flag.
    """
    import typer

    names = [f.name for f in fields(GenerationOptions)]
    hints = get_type_hints(GenerationOptions)
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
    added = []
    for f in fields(GenerationOptions):
        decls = [flag(f.name)] + ([f.metadata["short"]] if f.metadata["short"] else [])
        added.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=f.default,
                annotation=Annotated[hints[f.name], typer.Option(*decls, help=f.metadata["help"])],
            )
        )

    @functools.wraps(command)
    def run(**kwargs):
        values = {name: kwargs.pop(name) for name in names}
        try:
            options = GenerationOptions(**values)
        except OptionError as e:
            raise e.as_flags() from None
        return command(**kwargs, options=options)

    run.__signature__ = inspect.Signature([*own, *added])
    return run
