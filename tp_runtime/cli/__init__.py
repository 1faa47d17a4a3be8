"""The entry points, together: `tp-run` (run.py: generate, serve, chat, plan, demo) and
`tp-bench` (bench.py: sol, calibrate, sweep, serve). Flags become config objects and go to
the engine; nothing else happens here."""

from tp_runtime.cli.run import main

__all__ = ["main"]
