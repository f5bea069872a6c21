"""``python -m prestaged`` is the same as the ``prestaged`` console script."""

from __future__ import annotations

import sys

from prestaged.cli import main

sys.exit(main())
