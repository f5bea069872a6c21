"""The campaign file (TOML): its schema, its checks, and how its command templates are filled.

A campaign names stages; each stage cuts its input definition into submissions by its
``split`` (``all``, ``drainingn(N)``, ``list(a,b,c)``), runs its ``submit`` command template for
each once the submission's slice is warm, then polls its optional ``complete`` command. Stages
run after the stages named in their ``after``.

Commands are argv lists, never a shell: a template is split with ``shlex.split`` first, then
each element has its placeholders substituted (``render``), so no file or definition name can
inject shell syntax. A placeholder is a plain name: attribute or index access
(``{campaign.__class__}``), conversions and format specs are refused when the file is loaded,
so ``str.format`` never evaluates more than a lookup of a name.

Errors name the file and the key and read ``<key>: expected <what>, got <value>``, as the
config file's do (the same ``prestaged.config`` checks and loader).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import regex

from prestaged.config import (
    CATALOG,
    DAY,
    FRACTION,
    NON_EMPTY,
    PLAIN_NAME,
    Check,
    Duration,
    build_section,
    check,
    shown,
    within,
)
from prestaged.errors import ConfigError
from prestaged.files import read_small_text
from prestaged.model import has_control

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_JOB_ID_REGEX",
    "PLACEHOLDERS",
    "CampaignConfig",
    "CampaignDefaults",
    "Split",
    "StageConfig",
    "load_campaign",
    "parse_campaign",
    "parse_split",
    "render",
]

DEFAULT_JOB_ID_REGEX = r"JobsubJobId of first job: (\S+)"
"""What jobsub_submit prints; group 1 (or the whole match) becomes ``{job_id}``."""

PLACEHOLDERS = ("campaign", "stage", "submission", "definition", "files_file", "urls_file",
                "n_files", "job_id")
"""Placeholders of ``submit``/``complete`` (``{job_id}`` in ``complete`` only)."""

_SPLIT_FORMS = '"all", "drainingn(N)" with N >= 1, or "list(a,b,c)"'


@dataclass(frozen=True)
class Split:
    """A parsed ``split``: ``kind`` is ``all``, ``drainingn`` (with ``n``) or ``list`` (items)."""

    kind: str
    n: int = 0
    items: tuple[str, ...] = ()


def parse_split(text: str) -> Split:
    """Parse ``all`` | ``drainingn(N)`` (N >= 1) | ``list(a,b,c)``; ``ValueError`` otherwise."""
    t = text.strip()
    if t == "all":
        return Split("all")
    m = re.fullmatch(r"drainingn\(\s*([0-9]+)\s*\)", t)
    if m and int(m.group(1)) > 0:
        return Split("drainingn", n=int(m.group(1)))
    m = re.fullmatch(r"list\((.*)\)", t, re.DOTALL)
    if m:
        items = tuple(i.strip() for i in m.group(1).split(","))
        if items and all(items):
            return Split("list", items=items)
    raise ValueError(f"expected {_SPLIT_FORMS}")


def _is_split(v: str) -> bool:
    try:
        parse_split(v)
    except ValueError:
        return False
    return True


def _is_regex(v: str) -> bool:
    """Whether ``v`` compiles as the runner will use it (the ``regex`` module's syntax, a
    superset of ``re``'s)."""
    try:
        regex.compile(v)
    except regex.error:
        return False
    return True


_SPLIT = Check(_is_split, _SPLIT_FORMS)
_REGEX = Check(lambda v: bool(v) and _is_regex(v), "a valid, non-empty regular expression")
# Bounded above like the daemon's own durations (config.within): 1e300 s is no timeout.
_UP_TO_A_DAY = within(0, DAY, low_open=True, unit="s")
_UP_TO_30_DAYS = within(0, 30 * DAY, low_open=True, unit="s")
_UP_TO_A_YEAR = within(0, 365 * DAY, low_open=True, unit="s")
_CATALOG = CATALOG


@dataclass(frozen=True)
class CampaignDefaults:
    """``[defaults]``: settings shared by every stage."""

    catalog: Optional[str] = field(default=None, metadata=check(_CATALOG))
    """Catalog resolving stage inputs (``local``, ``samweb`` or ``metacat``); unset:
    ``catalog.default``."""
    ready: float = field(default=1.0, metadata=check(FRACTION))
    """Fraction of a submission's slice that must be warm before it is submitted."""
    keep_warm: Duration = field(default=Duration(4 * 3600.0), metadata=check(_UP_TO_30_DAYS))
    """Re-touch interval of a submitted slice until its ``complete`` command exits 0 (seconds)."""
    prestage_timeout: Duration = field(default=Duration(6 * 3600.0), metadata=check(_UP_TO_30_DAYS))
    """A slice not warm enough within this long fails, naming its cold files (seconds)."""
    prestage_retry: Duration = field(default=Duration(10.0), metadata=check(_UP_TO_A_DAY))
    """First wait before retrying cold files, doubling up to 10 minutes (seconds)."""
    submit_timeout: Duration = field(default=Duration(600.0), metadata=check(_UP_TO_A_DAY))
    """Longest run of one submit or complete command; then it is killed (seconds)."""
    complete_timeout: Duration = field(default=Duration(7 * 86400.0), metadata=check(_UP_TO_A_YEAR))
    """A submission whose ``complete`` command never exits 0 within this long fails (seconds)."""
    complete_poll: Duration = field(default=Duration(60.0), metadata=check(_UP_TO_A_DAY))
    """First wait between two ``complete`` polls, doubling up to ``complete_poll_max``
    (seconds)."""
    complete_poll_max: Duration = field(default=Duration(1800.0), metadata=check(_UP_TO_A_DAY))
    """Longest wait between two ``complete`` polls (seconds)."""


@dataclass(frozen=True)
class StageConfig:
    """One ``[[stage]]``: an input, how it is split, and the commands to run."""

    name: str = field(metadata=check(PLAIN_NAME))
    input: str = field(metadata=check(NON_EMPTY))
    """Input definition; may use ``{campaign}`` and ``{stage}``."""
    submit: str = field(metadata=check(NON_EMPTY))
    """Submit command template (see ``PLACEHOLDERS``)."""
    split: str = field(default="all", metadata=check(_SPLIT))
    complete: Optional[str] = field(default=None, metadata=check(NON_EMPTY))
    """Command polled after submission until it exits 0; unset: submitted counts as complete."""
    ready: Optional[float] = field(default=None, metadata=check(FRACTION))
    """Overrides ``defaults.ready`` for this stage."""
    job_id_regex: str = field(default=DEFAULT_JOB_ID_REGEX, metadata=check(_REGEX))
    release_after_complete: bool = False
    """Once ``complete`` exits 0 for a submission, release the tape pins prestaged's stage
    requests hold on its slice (``prestaged release``); needs ``complete``. Default false: the
    pins last ``storage.pin_lifetime``."""
    after: tuple[str, ...] = field(default=(), metadata={"internal": True, "key": True})
    """Stages that must be drained and complete before this one starts."""

    @property
    def parsed_split(self) -> Split:
        """``split`` parsed."""
        return parse_split(self.split)


@dataclass(frozen=True)
class CampaignConfig:
    """A whole campaign file."""

    name: str = field(metadata=check(PLAIN_NAME))
    defaults: CampaignDefaults = field(default_factory=CampaignDefaults)
    stage: tuple[StageConfig, ...] = ()
    source: Optional[Path] = field(default=None, metadata={"internal": True})

    def ordered(self) -> list[StageConfig]:
        """Stages in an order where every stage comes after those in its ``after``."""
        return _dependency_order(self.stage)


def render(template: str, values: Mapping[str, object]) -> list[str]:
    """``template`` split into argv with ``shlex.split``, then each element's placeholders
    filled from ``values``: a value is never split or parsed again, whatever it contains."""
    return [arg.format_map(values) for arg in shlex.split(template)]


# --- checks across keys: templates, stage names, dependencies ---------------------------------


def _bad_placeholder(text: str, allowed: Sequence[str]) -> Optional[tuple[str, str]]:
    """The first placeholder of ``text`` other than a plain ``{name}`` with ``name`` among
    ``allowed``: (it as written, why it is refused when its name alone does not say), or None.
    ``ValueError`` when ``text`` is no format string at all (a single brace)."""
    # Only plain names: str.format would evaluate attribute and index access
    # ({campaign.__init__.__globals__}) and format specs ({stage:>1000000000} allocates that
    # many characters), so nothing but a name ever reaches it (render, the runner's _input).
    for _, name, spec, conv in string.Formatter().parse(text):
        if name is None:
            continue
        written = _escaped("{" + name + (f"!{conv}" if conv else "")
                           + (f":{spec}" if spec else "") + "}")
        if "." in name or "[" in name:
            return written, "a placeholder is a plain name: no attribute or index access"
        if spec:
            return written, "a placeholder takes no format spec"
        if name not in allowed or conv:
            return written, ""
    return None


def _escaped(text: str) -> str:
    """``text`` with control characters escaped as JSON does, so an error stays one line."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _template_error(key: str, text: str, allowed: Sequence[str]) -> Optional[str]:
    """Why ``text`` is not a usable command template, as a whole sentence naming ``key``."""
    expected = ("a command whose placeholders are among "
                + " ".join("{" + p + "}" for p in allowed) + " (write {{ for a literal {)")
    if has_control(text.replace("\t", " ").replace("\n", " ").replace("\r", " ")):
        # A NUL cuts the argument short (uvloop) or fails the launch (asyncio) after
        # `submitting` is stored; an escape sequence would reach the log and listings.
        return (f"{key}: expected a command line without control characters (tabs and line "
                f"breaks are spaces), got {shown(text)}")
    try:
        argv = shlex.split(text)
    except ValueError as e:
        return (f"{key}: expected a command line that splits into arguments, "
                f"got {shown(text)} ({e})")
    if not argv or not argv[0]:  # '""' splits into one empty word: no program to run
        return f"{key}: expected a command, got {shown(text)}"
    for arg in argv:
        try:
            bad = _bad_placeholder(arg, allowed)
        except ValueError as e:
            return f"{key}: expected {expected}, got {shown(text)} ({e})"
        if bad is not None:
            written, why = bad
            return f"{key}: expected {expected}, got {written}" + (f" ({why})" if why else "")
    return None


def _input_error(key: str, text: str) -> Optional[str]:
    """Why ``text`` is not a usable input definition name, as a whole sentence naming
    ``key``: its placeholders may only be ``{campaign}`` and ``{stage}``."""
    expected = ("a definition name whose placeholders are among {campaign} {stage} "
                "(write {{ for a literal {)")
    try:
        bad = _bad_placeholder(text, ("campaign", "stage"))
    except ValueError as e:
        return f"{key}: expected {expected}, got {shown(text)} ({e})"
    if bad is None:
        return None
    written, why = bad
    return f"{key}: expected {expected}, got {shown(text)}" + (f" ({written}: {why})"
                                                                 if why else "")


def _after(raw: object, key: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ConfigError(f"{key}: expected a list of stage names, got {shown(raw)}")
    twice = next((a for i, a in enumerate(raw) if a in raw[:i]), None)
    if twice is not None:
        raise ConfigError(f"{key}: expected each stage name once, got {shown(twice)} twice")
    return tuple(raw)


def _check_stages(stages: Sequence[StageConfig]) -> None:
    """Names unique, ``after`` known, no cycles, templates usable."""
    index: dict[str, int] = {}
    for i, s in enumerate(stages):
        if s.name in index:
            raise ConfigError(f"stage[{i}].name: expected a name no other stage has, got "
                              f"{shown(s.name)} (the name of stage[{index[s.name]}])")
        index[s.name] = i
    for i, s in enumerate(stages):
        for up in s.after:
            if up not in index:
                raise ConfigError(f"stage[{i}].after: expected names of stages of this "
                                  f"campaign ({', '.join(index)}), got {shown(up)}")
        problems = (_input_error(f"stage[{i}].input", s.input),
                    _template_error(f"stage[{i}].submit", s.submit, PLACEHOLDERS[:-1]),
                    s.complete and _template_error(f"stage[{i}].complete", s.complete,
                                                   PLACEHOLDERS))
        for problem in problems:
            if problem:
                raise ConfigError(problem)
        if s.release_after_complete and s.complete is None:
            # Without `complete` a submission counts as complete once submitted: releasing
            # then would drop the pins before its jobs read the files.
            raise ConfigError(f"stage[{i}].release_after_complete: expected a stage with a "
                              "complete command (without one a submission is complete as soon "
                              "as it is submitted, before its jobs read the files), got true; "
                              "set complete or drop release_after_complete")
    _dependency_order(stages)


def _dependency_order(stages: Sequence[StageConfig]) -> list[StageConfig]:
    """``stages`` ordered so that each comes after those in its ``after`` (names known);
    ``ConfigError`` naming ``stage[i].after`` of the first stage from which a cycle is
    reached. Linear in stages and ``after`` entries, and without recursion: a long chain or
    many diamonds of stages costs neither the stack nor exponential time."""
    by_name = {s.name: s for s in stages}
    out: list[StageConfig] = []
    done: set[str] = set()
    for i, root in enumerate(stages):
        if root.name in done:
            continue
        path, on_path = [root.name], {root.name}
        todo = [iter(root.after)]
        while todo:
            up = next(todo[-1], None)
            if up is None:  # every stage this one runs after is placed: place it
                todo.pop()
                name = path.pop()
                on_path.discard(name)
                done.add(name)
                out.append(by_name[name])
            elif up in on_path:
                cycle = [*path[path.index(up):], up]
                raise ConfigError(f"stage[{i}].after: expected stages that do not run after "
                                  "this one, got a dependency cycle: "
                                  + " runs after ".join(cycle))
            elif up not in done:
                path.append(up)
                on_path.add(up)
                todo.append(iter(by_name[up].after))
    return out


# --- loading ----------------------------------------------------------------------------------


CAMPAIGN_MAX_BYTES = 128 << 10
"""A campaign file's largest size: one is a few KiB, and ``campaign add`` sends it whole to the
daemon, whose API reads at most 256 KiB of JSON (the file's quotes and newlines escaped)."""


def read_campaign(path: Path) -> str:
    """A campaign file's text (not checked yet); ``ConfigError`` naming the file (exit 2) when
    it is missing, unreadable, not UTF-8 or larger than ``CAMPAIGN_MAX_BYTES``."""
    return read_small_text(path, CAMPAIGN_MAX_BYTES, "campaign")


def load_campaign(path: Path) -> CampaignConfig:
    """Load and validate a campaign file; ``ConfigError`` naming the file and key (exit 2)."""
    return parse_campaign(read_campaign(path), path)


def parse_campaign(text: str, path: Path) -> CampaignConfig:
    """Validate campaign file ``text`` read from ``path`` (named in errors; a daemon gets the
    text and the path it came from); ``ConfigError`` naming the file and key (exit 2)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, sent as JSON "\ud800" to the daemon
        raise ConfigError(f"campaign {path}: not valid text: a lone surrogate at character "
                          f"{e.start}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"campaign {path}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"campaign {path}: invalid TOML: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError(f"campaign {path}: invalid TOML: {e}") from None
    try:
        # `after` is a list of strings, which the config loader has no type for: taken out
        # here, checked, and put back after the rest is built.
        stages = data.get("stage", [])
        afters: list[tuple[str, ...]] = []
        if isinstance(stages, list):
            for i, s in enumerate(stages):
                raw = s.pop("after", []) if isinstance(s, dict) else []
                afters.append(_after(raw, f"stage[{i}].after"))
        cfg = build_section(CampaignConfig, data, "", path.parent)
        if not cfg.stage:
            raise ConfigError("stage: a campaign needs at least one [[stage]] table, got none")
        built = tuple(dataclasses.replace(s, after=a) for s, a in zip(cfg.stage, afters))
        _check_stages(built)
        d = cfg.defaults
        if d.complete_poll > d.complete_poll_max:
            raise ConfigError(f"defaults.complete_poll: expected at most complete_poll_max "
                              f"({d.complete_poll_max:g} s), got {d.complete_poll:g} s")
    except ConfigError as e:
        raise ConfigError(f"campaign {path}: {e}") from None
    return dataclasses.replace(cfg, stage=built, source=path)
