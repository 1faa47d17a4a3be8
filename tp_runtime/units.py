"""Parsing of the human units flags take: durations (200us, 1.5ms, 2s) and bandwidths (1Gbit, 10GB)."""

from __future__ import annotations

import re
from decimal import Decimal

from tp_runtime.errors import ConfigError

# decimal scales, so that "0.1us" is exactly 1e-07 (sweeps use durations as keys)
_DURATION = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"), "ms": Decimal("1e-3"), "s": Decimal(1)}
# per second; bit units are divided by 8 to give bytes/s
_BANDWIDTH = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
    "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def parse_duration(text: str) -> float:
    """'200us' -> 2e-4 seconds. A bare number is seconds; '0' is zero."""
    m = _NUMBER_UNIT.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or (unit and unit not in _DURATION):
        raise ConfigError(f"cannot read duration {text!r}: use a number with ns, us, ms or s (e.g. 200us)")
    return float(Decimal(m.group(1)) * _DURATION[unit or "s"])


def parse_bandwidth(text: str) -> float:
    """'1Gbit' -> 1.25e8 bytes/s; 'GB' units are bytes. Returns bytes per second."""
    norm = str(text).strip().lower().removesuffix("/s")
    if norm.endswith("bps"):  # Mbps, Gbps: bits per second
        norm = norm[: -len("bps")] + "bit"
    m = _NUMBER_UNIT.match(norm)
    unit = m.group(2) if m else None
    if not m or unit not in _BANDWIDTH:
        raise ConfigError(f"cannot read bandwidth {text!r}: use e.g. 1Gbit, 100Mbit (bits/s) or 10GB, 500MB (bytes/s)")
    value = float(m.group(1)) * _BANDWIDTH[unit]
    if value <= 0:
        raise ConfigError(f"bandwidth {text!r} must be positive")
    return value


def format_duration(seconds: float) -> str:
    """1e-05 -> '10us', 0 -> '0'."""
    if seconds == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale * 0.9999 or unit == "ns":
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds:g}s"


# binary units for memory sizes (what nvidia-smi and free -h print); decimal ones as written
_BYTES = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}
_MAX_BYTES = 2**62  # far beyond any machine; keeps byte counts in int64


def parse_bytes(text: str) -> int:
    """'8GiB' or '8G' -> 8 * 2**30, '500MB' -> 5e8. A bare number is bytes."""
    m = _NUMBER_UNIT.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _BYTES:
        raise ConfigError(f"cannot read size {text!r}: use e.g. 512MiB, 8GiB, 8G (binary) or 500MB, 10GB (decimal)")
    value = Decimal(m.group(1)) * _BYTES[unit]  # exact: 2.01KB is 2010 bytes, not 2009
    if value > _MAX_BYTES:
        raise ConfigError(f"size {text!r} is too large")
    return int(value)


def format_bytes(n: float) -> str:
    """12345678 -> '11.8 MiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
