"""How the emulators end when run as processes of their own (``python -m prestaged.testing.X``)."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


def exit_quietly(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s code; Ctrl-C (before the server took SIGINT over, or after it let
    go) exits 130, and a reader of the ready line that went away exits 1, both without a
    traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # Python flushes stdout once more at exit: into /dev/null, so that says nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
