"""Sizes in bytes, read and written the one way every flag uses (--gpu-memory, --data-disk-budget).
No torch here."""

from __future__ import annotations

import re

from gptlab.errors import UserError

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)
_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a size such as 500M, 1.5G, 20K, 80GB, 2GiB. K/M/G/T are powers of 1024
    with or without a trailing (i)B: memory and disks are quoted in binary units here (an '80 GB'
    H100 has 80 GiB). `what` (e.g. the flag) starts the error message."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.fullmatch(str(value))
        if not m:
            raise UserError(f"{what} {value!r}: expected a size such as 500M, 2G, 80GiB or 1048576")
        n = int(float(m.group(1)) * _SCALE[m.group(2).lower()])
    if n <= 0:
        raise UserError(f"{what} {value!r}: must be positive")
    return n


def human(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 20.0 MiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
