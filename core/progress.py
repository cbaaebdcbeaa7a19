"""Progress bars: tqdm, switched off on ranks other than 0, when the caller asks, or by TQDM_DISABLE.

tqdm applies ``TQDM_DISABLE`` only to bars whose caller passes no ``disable`` and reads it once,
when tqdm is imported; every bar in ``core`` passes one, so this reads the variable itself, each
time a bar starts (``TQDM_DISABLE=1 python -m core build > build.log`` gives a log without bars).
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm


def bars_off() -> bool:
    """True when the environment asks for no progress bars (TQDM_DISABLE set, and not to 0/false)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown when ``show`` and the environment allow it."""
    return tqdm(iterable, disable=not show or bars_off(), **kwargs)


def end_bars() -> None:
    """Close every open bar. An error raised under a bar leaves it open while the traceback keeps
    its frame alive, and the error message then printed on the bar's line; closed, the bar ends
    its line (or clears it, with ``leave=False``) first."""
    for bar in list(std_tqdm._instances):
        bar.close()
