"""One exception type for mistakes a user can fix.

The CLI prints ``error: <message>`` and exits with code 2 for these; the dashboard
shows the message in a box. Anything else is a bug and keeps its traceback.
A message names the problem *and* the fix, e.g.
``"data.csv has no column 'text' (columns: review, stars); name the right ones with --set data.text_column=..."``.
"""

import math
import os
from pathlib import Path


class LayerscopeError(Exception):
    """A problem with the user's input, files or environment, with a fix in the message."""



class StatsUnreadable(LayerscopeError):
    """A feature-statistics file that is there but cannot be read as the features step wrote it
    (``core.features_step.load_stats``): readers that rank features say so rather than rank otherwise."""

def user_path(path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded. A user that does not exist (or a ``~``
    without a home folder) is a LayerscopeError, where ``Path.expanduser`` raises RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise LayerscopeError(f"cannot expand '{str(path).split('/')[0]}' in {path}: no such user, or no home folder; pass the path without it") from None


MAX_THREADS = 1024  # the most torch threads a config may ask for


class OptionCheck:
    """Checks of one config section's values, run before any work starts.

    Each failed check raises one ``LayerscopeError`` naming the option, what it must be and how
    to set it::

        check = OptionCheck("finetune", cfg)
        check.positive("epochs", "learning_rate")   # finetune.epochs=-1.0 must be > 0 ...
        check.choice("attention", "auto", "eager", "sdpa")
    """

    def __init__(self, section: str, cfg) -> None:
        self.section, self.cfg = section, cfg

    def fail(self, name: str, must: str) -> None:
        where = f"{self.section}.{name}"
        raise LayerscopeError(f"{where}={getattr(self.cfg, name)!r} must be {must}; change it in your --config file or with --set {where}=VALUE")

    def _number(self, name: str):
        value = getattr(self.cfg, name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None

    def at_least(self, low: float, *names: str) -> None:
        for name in names:
            value = self._number(name)
            if value is None or value < low:
                self.fail(name, f"a number >= {low}")

    def at_most(self, high: int, *names: str, why: str = "") -> None:
        """An upper bound where a huge count would overflow or exhaust memory minutes in."""
        for name in names:
            value = self._number(name)
            if value is None or value > high:
                self.fail(name, f"a number <= {high:,}" + (f" ({why})" if why else ""))

    def positive(self, *names: str) -> None:
        for name in names:
            value = self._number(name)
            if value is None or value <= 0:
                self.fail(name, "a number > 0")

    def fraction(self, *names: str, below_one: bool = False, above_zero: bool = False) -> None:
        """0 <= value <= 1 (> 0 with ``above_zero``, < 1 with ``below_one``)."""
        for name in names:
            value = self._number(name)
            if value is None or value < 0 or value > 1 or (below_one and value == 1) or (above_zero and value == 0):
                self.fail(name, f"a fraction in {'(' if above_zero else '['}0, 1{')' if below_one else ']'}")

    def seed(self, *names: str) -> None:
        """A random seed: a whole number from 0 to 2**31 - 1 (what numpy, sklearn and torch all
        take, with room for the offsets added per layer)."""
        for name in names:
            value = getattr(self.cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
                self.fail(name, "a whole number from 0 to 2147483647 (2**31 - 1)")

    def threads(self, name: str) -> None:
        """A torch thread count: 0 (torch's default) or a whole number up to 1,024. More threads
        than that only wait on each other, and a huge count exhausts memory starting them."""
        value = getattr(self.cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THREADS:
            self.fail(name, f"a whole number from 0 (torch's default) to {MAX_THREADS:,}; this machine has {os.cpu_count() or 1} CPU cores")

    def choice(self, name: str, *options: str) -> None:
        if getattr(self.cfg, name) not in options:
            self.fail(name, "one of " + ", ".join(repr(o) for o in options))

    def indices(self, name: str) -> None:
        """A list of hidden-state indices: integers >= 0."""
        values = getattr(self.cfg, name)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            self.fail(name, "a list of hidden-state indices >= 0 (0 = embeddings)")
