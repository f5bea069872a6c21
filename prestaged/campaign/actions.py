"""Operator actions on a campaign, one implementation for the CLI's offline path and the daemon.

``apply_action`` validates the request, changes the campaign's rows and returns the one line
that both ``prestaged campaign hold ...`` (on a state file) and the daemon's API answer with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from prestaged.campaign.repository import CampaignRepository
from prestaged.config import PLAIN_NAME, checked
from prestaged.errors import ConfigError, NotFoundError
from prestaged.model import printable

__all__ = ["ACTIONS", "JOB_ID_MAX", "apply_action", "check_names", "usable_job_id"]

JOB_ID_MAX = 256
"""The longest job id ``mark-submitted`` takes (jobsub's are ``<cluster>.<proc>@<schedd>``)."""

ACTIONS = ("hold", "release", "cancel", "retry", "mark-submitted")
"""Operator actions (``prestaged campaign ACTION``, ``POST /api/v1/campaigns/<name>/<action>``)."""


def apply_action(state: CampaignRepository, name: str, action: str, *, stage: Optional[str] = None,
                 submission: Optional[int] = None, job_id: Optional[str] = None,
                 stages: Optional[Sequence[str]] = None, ahead: bool = False) -> str:
    """Apply ``action`` (one of ``ACTIONS``) to campaign ``name`` (or one ``stage``) and return
    a one-line account. ``stages`` are the campaign's stage names when known (the daemon's
    running config); otherwise those the state has (``CampaignRepository.stage_names``: the
    stored registration's, else those its runs recorded), if any.

    With ``ahead`` (campaigns run in the foreground, whose files are not registered), a hold
    or cancel may name a campaign that has not run yet: it then starts held or cancelled.
    Otherwise an unknown campaign is a ``NotFoundError`` (the daemon knows every campaign it
    runs: ``campaign add --held`` holds one from the start). Raises
    ``NotFoundError`` for an unknown stage or submission, ``ConfigError`` for
    a malformed request (a ``name`` or ``stage`` no campaign file can have: ``check_names``),
    ``ConflictError`` for a transition the submission's state refuses.
    """
    if action not in ACTIONS:
        raise ConfigError(f"unknown action '{action}': expected one of {', '.join(ACTIONS)}")
    check_names(name, stage)
    exists = name in state.names()
    if not exists and not (ahead and action in ("hold", "cancel")):
        raise NotFoundError(f"no campaign '{name}'")
    # A campaign recorded without stages (only held or cancelled ahead) takes any stage name.
    known = list(stages) if stages is not None else state.stage_names(name)
    if stage is not None and known and stage not in known:
        raise NotFoundError(f"campaign '{name}' has no stage '{stage}'; its stages are "
                            + ", ".join(known))
    scope = name + (f"/{stage}" if stage else "")
    # A hold or cancel may come before a campaign's first run; say so, in case of a typo.
    note = "" if exists else f" (no campaign '{name}' is known yet: it will start so)"
    if action == "hold":
        state.hold(name, stage)
        return f"{scope}: held{note}"
    if action == "release":
        retried = state.release(name, stage)
        return f"{scope}: released" + "".join(f"; {s.reason}: #{s.id} {s.item} queued"
                                              for s in retried)
    if action == "cancel":
        cancelled = state.cancel(name, stage)
        return f"{scope}: cancelled{note}" + "".join(f"; #{s.id} {s.item} cancelled"
                                                       for s in cancelled)
    if submission is None:
        raise ConfigError(f"{action}: the submission id is missing (give --submission ID, or "
                          '"submission": <id> in the request)')
    if action == "retry":
        new = state.retry(name, submission)
        return f"{name}/{new.stage}: #{new.id} {new.item} queued ({new.reason})"
    if not job_id:
        raise ConfigError('mark-submitted: the job id is missing (give --job-id JOB_ID, or '
                          '"job_id": "<id>" in the request)')
    if not usable_job_id(job_id):
        # It is shown in listings and passed to `complete`: no line breaks or escapes.
        raise ConfigError(f"mark-submitted: expected a job id of at most {JOB_ID_MAX} "
                          f"characters without control characters, got '{printable(job_id[:80])}'"
                          + ("..." if len(job_id) > 80 else ""))
    sub = state.mark_submitted(name, submission, job_id)
    return f"{name}/{sub.stage}: #{sub.id} {sub.item} submitted, job {sub.job_id}"


def usable_job_id(job_id: str) -> bool:
    """Whether ``job_id`` may be stored, shown and given to ``complete``: 1 to ``JOB_ID_MAX``
    printable characters (no control characters, no U+FFFD standing for undecodable bytes)."""
    return 0 < len(job_id) <= JOB_ID_MAX and job_id.isprintable() and "\ufffd" not in job_id


def check_names(name: str, stage: Optional[str] = None) -> None:
    """``ConfigError`` (exit 2, HTTP 400) unless campaign ``name`` and ``stage`` (if given)
    are plain names, the rule of a campaign file's ``name`` and ``[[stage]] name``: an action
    on any other name could never reach a campaign, and a hold would only be stored and
    listed as if one existed."""
    checked("campaign name", name, PLAIN_NAME, "string")
    if stage is not None:
        checked("stage name", stage, PLAIN_NAME, "string")
