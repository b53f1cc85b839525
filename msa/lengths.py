"""Context lengths written the way people say them: ``"4k,16k,1m"``."""
from __future__ import annotations

import argparse


def parse_lengths(text: str):
    """``"4k,16k,1m"`` -> ``[4096, 16384, 1048576]`` (suffixes k = 1024, m = 1024**2)."""
    def one(s):
        s = s.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1)
        num = s[:-1] if mult > 1 else s
        try:
            value = float(num) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a length: {s!r} (write e.g. 4096, 4k, "
                                             f"1.5k, 1m)") from None
        if value != int(value) or value < 1:
            raise argparse.ArgumentTypeError(f"not a whole positive length: {s!r}")
        return int(value)
    out = [one(s) for s in text.split(",") if s.strip()]
    if not out:
        raise argparse.ArgumentTypeError("give at least one length")
    return out
