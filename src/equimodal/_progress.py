"""Progress bars only where a person watches: on a terminal, never in a redirected log."""
from __future__ import annotations

import sys


def show_progress(wanted: bool = True) -> bool:
    """``wanted`` and standard error is a terminal (tqdm writes there); carriage-return updates in a
    file or a pipe only bloat logs."""
    if not wanted:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False
