"""Run a command with a test hook injected, for tests that interrupt it at a known point.

``python tests/run_with_hook.py HOOK VALUE MODULE [ARGS...]`` runs ``python -m MODULE
ARGS...`` with:

- ``convert-pause SECONDS``: ``convert(on_weights_written=...)`` sleeps once the weights
  are in the staging folder;
- ``train-pause STEP:SECONDS``: ``train(on_step=...)`` sleeps after optimizer step STEP;
- ``embed-delay SECONDS``: ``embed(after_batch=..., midway=...)`` sleeps after each encoded
  batch and in the middle of each shard write.

The package has no test hooks of its own: it takes callbacks, which this script passes.
"""

import functools
import runpy
import sys
import time

import mlx_llama3v  # noqa: F401  (the BLAS choice comes before mlx.core)


def main() -> None:
    hook, value, module, *args = sys.argv[1:]
    if hook == "convert-pause":
        import mlx_llama3v.convert.cli as cli

        seconds = float(value)
        cli.convert = functools.partial(cli.convert, on_weights_written=lambda: time.sleep(seconds))
    elif hook == "train-pause":
        import mlx_llama3v.train.run as run

        at, seconds = value.split(":")

        def pause(step: int) -> None:
            if step == int(at):
                time.sleep(float(seconds))

        run.train = functools.partial(run.train, on_step=pause)
    elif hook == "embed-delay":
        import mlx_llama3v.embed.runner as runner

        seconds = float(value)
        sleep = lambda: time.sleep(seconds)  # noqa: E731
        runner.embed = functools.partial(runner.embed, after_batch=sleep, midway=sleep)
    else:
        raise SystemExit(f"unknown hook {hook!r}")
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
