"""Datasets for the emulated dCache: a synthetic tape dataset, or a JSON manifest of files.

Both give ``FileSpec`` lists that ``DCacheCore.add_file`` takes one by one, so a benchmark can
build the very same list (for its URLs) that the emulator process serves.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prestaged.testing.dcache.model import Locality

__all__ = ["FileSpec", "load_manifest", "synthetic"]


@dataclass(frozen=True)
class FileSpec:
    """One file to create: namespace ``path``, ``size`` in bytes, ``locality``, tape volume."""

    path: str
    size: int
    locality: Locality
    tape: str = "T0001"


def synthetic(files: int, *, tape_fraction: float = 0.7, tapes: int = 20, size: int = 1 << 20,
              prefix: str = "/pnfs/bench", seed: int = 0) -> list[FileSpec]:
    """``files`` files ``<prefix>/f<i:07d>.root`` of ``size`` bytes in listing order; file ``i``
    is on tape ``T<i mod tapes>`` (so listing order visits the tapes round-robin, the worst
    order for a tape library), and ``round(files * tape_fraction)`` of them, drawn with
    ``random.Random(seed)``, are tape-only; the others have a cached disk copy too.

    The draw is random rather than periodic because a period would line up with ``i mod
    tapes``: with 70 % as "7 of every 10", whole tapes would hold no tape-only file at all.
    """
    if files < 0 or tapes < 1 or not 0.0 <= tape_fraction <= 1.0:
        raise ValueError(f"need files >= 0, tapes >= 1 and 0 <= tape_fraction <= 1; got "
                         f"{files}, {tapes}, {tape_fraction}")
    tape_only = set(random.Random(seed).sample(range(files), round(files * tape_fraction)))
    width = max(3, len(str(tapes - 1)))
    return [FileSpec(f"{prefix.rstrip('/')}/f{i:07d}.root", size,
                     Locality.TAPE if i in tape_only else Locality.DISK_AND_TAPE,
                     f"T{i % tapes:0{width}d}")
            for i in range(files)]


def load_manifest(path: Path) -> list[FileSpec]:
    """Files from a JSON list of ``{"path", "size", "locality", "tape"}`` objects; locality is
    ``disk``, ``tape``, ``disk+tape`` or ``lost`` (``Locality`` values), ``tape`` is optional.
    ValueError naming the entry when one is malformed."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a JSON list of files")
    return [_spec(path, n, item) for n, item in enumerate(doc)]


def _spec(path: Path, n: int, item: Any) -> FileSpec:
    try:
        spec = FileSpec(str(item["path"]), int(item["size"]), Locality(item["locality"]),
                        str(item.get("tape", "T0001")))
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: file {n}: {e!r}; expected an object with path, size, "
                         f"locality ({', '.join(x.value for x in Locality)}) and tape") from None
    if not spec.path.startswith("/") or spec.size < 0:
        raise ValueError(f"{path}: file {n}: need an absolute path and a size >= 0")
    return spec
