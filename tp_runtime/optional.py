"""Optional dependencies, imported where a command reaches them.

A plain `pip install tp-runtime` has no matplotlib (the `bench` extra) and no transformers (the
`test` extra). A command that only draws with one finishes its work and says in one line what to
install for the picture (`pyplot`); a command that cannot run without one stops before it starts,
naming the extra (`require`). A leaf like errors.py: the bench scripts and the CLI both use it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from tp_runtime.errors import ConfigError

# package -> the extra of pyproject.toml that installs it
EXTRAS = {"matplotlib": "bench", "transformers": "test"}


def install_hint(package: str) -> str:
    extra = EXTRAS.get(package)
    return f"pip install 'tp-runtime[{extra}]'" if extra else f"pip install {package}"


def pyplot(what: str) -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, or None after one line on stderr saying that `what`
    (a file name) was not drawn and how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"note: {what} not drawn: matplotlib cannot be imported ({e}); {install_hint('matplotlib')} for plots", file=sys.stderr)
        return None
    return plt


def require(package: str, purpose: str) -> ModuleType:
    """Import `package` or raise a ConfigError naming `purpose` and the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"{purpose} needs {package}, which cannot be imported ({e}); {install_hint(package)}") from None
