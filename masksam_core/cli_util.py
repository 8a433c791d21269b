"""Small helpers shared by the command-line doors."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from .errors import MaskSAMError


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; turn a :class:`MaskSAMError` into one line on stderr and exit code 2.

    ``KeyboardInterrupt`` gives exit code 130 with a one-line message.
    """
    try:
        return int(main(argv) or 0)
    except MaskSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: cancelled", file=sys.stderr)
        return 130
