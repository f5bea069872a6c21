"""The campaign file: every refused value or structure reads as one whole sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_config import assert_sentence, toml_value, validated_keys

from prestaged.campaign.spec import CampaignConfig, load_campaign, parse_campaign
from prestaged.errors import ConfigError

STAGE = {"name": "a", "input": "d", "submit": "x"}

# A value each checked key refuses (of the right type); each also gets `true`, the wrong type.
BAD_VALUES: dict[str, object] = {
    "name": "two words",
    "defaults.catalog": "rucio", "defaults.ready": 1.5, "defaults.keep_warm": 0,
    "defaults.prestage_timeout": 0, "defaults.prestage_retry": -1,
    "defaults.submit_timeout": "0s", "defaults.complete_timeout": 0,
    "defaults.complete_poll": 0, "defaults.complete_poll_max": 0,
    "stage[0].name": "a/b", "stage[0].input": " ", "stage[0].submit": " ",
    "stage[0].split": "drainingn(0)", "stage[0].complete": " ", "stage[0].ready": 0,
    "stage[0].job_id_regex": "(unclosed",
}

PLACEHOLDERS = ("{campaign} {stage} {submission} {definition} {files_file} {urls_file} "
                "{n_files}")
LITERAL = "(write {{ for a literal {)"

# Checks across keys: (stages, key, the message after "<key>: ").
STRUCTURE = [
    ([{**STAGE, "after": 3}], "stage[0].after", "expected a list of stage names, got 3"),
    ([{**STAGE, "after": ["zz"]}], "stage[0].after",
     'expected names of stages of this campaign (a), got "zz"'),
    ([STAGE, STAGE], "stage[1].name",
     'expected a name no other stage has, got "a" (the name of stage[0])'),
    ([{**STAGE, "after": ["b"]}, {**STAGE, "name": "b", "after": ["a"]}], "stage[0].after",
     "expected stages that do not run after this one, got a dependency cycle: a runs after "
     "b runs after a"),
    ([{**STAGE, "submit": "x {dataset}"}], "stage[0].submit",
     f"expected a command whose placeholders are among {PLACEHOLDERS} {LITERAL}, "
     "got {dataset}"),
    ([{**STAGE, "submit": "x {stage!r}"}], "stage[0].submit",
     f"expected a command whose placeholders are among {PLACEHOLDERS} {LITERAL}, "
     "got {stage!r}"),
    ([{**STAGE, "submit": '""'}], "stage[0].submit", 'expected a command, got "\\"\\""'),
    ([{**STAGE, "submit": "x 'y"}], "stage[0].submit",
     "expected a command line that splits into arguments, got \"x 'y\" "
     "(No closing quotation)"),
    ([{**STAGE, "complete": "check {job}"}], "stage[0].complete",
     f"expected a command whose placeholders are among {PLACEHOLDERS} {{job_id}} {LITERAL}, "
     "got {job}"),
    ([{**STAGE, "input": "ds-{x}"}], "stage[0].input",
     "expected a definition name whose placeholders are among {campaign} {stage} "
     f'{LITERAL}, got "ds-{{x}}"'),
    ([], "stage", "a campaign needs at least one [[stage]] table, got none"),
    ([{**STAGE, "name": "b"}, {**STAGE, "after": ["b", "b"]}], "stage[1].after",
     'expected each stage name once, got "b" twice'),
    # A NUL cut uvloop's argument short (asyncio: a traceback, `submitting` left behind).
    ([{**STAGE, "submit": "echo a\u0000b"}], "stage[0].submit",
     "expected a command line without control characters (tabs and line breaks are spaces), "
     'got "echo a\\u0000b"'),
    ([{**STAGE, "complete": "check \u001b[2J{job_id}"}], "stage[0].complete",
     "expected a command line without control characters (tabs and line breaks are spaces), "
     'got "check \\u001b[2J{job_id}"'),
]


@pytest.mark.parametrize(("key", "value", "rest"), [
    # Names make file names (255 bytes at most): a 300-character one failed at run time.
    ("name", "a" * 101, "expected a plain name (letters, digits, _.-; at most 100 characters)"),
    ("stage[0].name", "s" * 101,
     "expected a plain name (letters, digits, _.-; at most 100 characters)"),
    ("stage[0].split", "drainingn(\u0663)", 'expected "all", "drainingn(N)" with N >= 1'),
    ("stage[0].job_id_regex", "", "expected a valid, non-empty regular expression"),
    ("defaults.submit_timeout", 1e300, "expected a duration above 0 and at most 86400 s"),
    ("defaults.keep_warm", "99999999999999999999d",
     "expected a duration above 0 and at most 2592000 s"),
    ("defaults.complete_timeout", "400d",
     "expected a duration above 0 and at most 31536000 s"),
])
def test_names_splits_regexes_and_durations_have_bounds(
        tmp_path: Path, key: str, value: object, rest: str) -> None:
    """What the campaign review got through: over-long names, a non-ASCII digit, an empty job
    id pattern, durations without end."""
    text = campaign_text(key, value, [STAGE])
    assert error_of(tmp_path, text).startswith(f"{key}: {rest}")


def test_complete_poll_may_not_exceed_its_maximum(tmp_path: Path) -> None:
    """``complete_poll = "1h"`` with ``complete_poll_max = "1s"`` was taken."""
    text = campaign_text("defaults.complete_poll", "1h", [STAGE]).replace(
        "[defaults]\n", '[defaults]\ncomplete_poll_max = "1s"\n')
    assert error_of(tmp_path, text) == ("defaults.complete_poll: expected at most "
                                        "complete_poll_max (1 s), got 3600 s")


def test_an_unknown_stage_key_names_after_among_the_keys(tmp_path: Path) -> None:
    """`after` is taken out of a stage before the rest is checked, so the hint for a
    misspelt key never listed it, nor suggested it for `afetr`."""
    text = campaign_text("stage[0].afetr", ["x"], [STAGE])
    said = error_of(tmp_path, text)
    assert said.startswith("unknown key stage[0].afetr (did you mean stage[0].after?); keys "
                           "here: after, complete,"), said


def campaign_text(key: str, value: object, stages: list[dict[str, object]]) -> str:
    """A campaign file with ``stages`` and ``key`` (``k``, ``defaults.k``, ``stage[0].k``)
    set to ``value``."""
    stages = [dict(s) for s in stages]
    top, defaults = {"name": "c"}, {}
    if key.startswith("stage[0]."):
        stages[0][key.split(".", 1)[1]] = value
    elif key.startswith("defaults."):
        defaults[key.split(".", 1)[1]] = value
    else:
        top[key] = value

    def table(d: dict[str, object]) -> str:
        return "".join(f"{k} = {toml_value(v)}\n" for k, v in d.items())

    return (table(top) + (f"[defaults]\n{table(defaults)}" if defaults else "")
            + "".join(f"[[stage]]\n{table(s)}" for s in stages))


def error_of(tmp_path: Path, text: str) -> str:
    """The message of loading campaign file ``text``, without its "campaign <path>: " prefix."""
    path = tmp_path / "campaign.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_campaign(path)
    prefix = f"campaign {path}: "
    assert str(err.value).startswith(prefix)
    return str(err.value)[len(prefix):]


def test_bad_value_table_covers_every_checked_key() -> None:
    """The table names every campaign file key that has a value check."""
    assert sorted(BAD_VALUES) == sorted(validated_keys(CampaignConfig))


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_every_value_error_is_a_whole_sentence(tmp_path: Path, key: str) -> None:
    """A refused value of any checked key reads "<key>: expected <what>, got <value>"."""
    for value in (BAD_VALUES[key], True):
        assert_sentence(error_of(tmp_path, campaign_text(key, value, [STAGE])), key, value)


@pytest.mark.parametrize(("stages", "key", "rest"), STRUCTURE)
def test_every_structure_error_is_a_whole_sentence(
        tmp_path: Path, stages: list[dict[str, object]], key: str, rest: str) -> None:
    """Stage names, dependencies and templates are refused in the same sentence shape."""
    message = error_of(tmp_path, campaign_text("name", "c", stages))
    assert message == f"{key}: {rest}"


def test_reported_fragments_read_whole(tmp_path: Path) -> None:
    """The review's "a non-empty, got" and "a fraction in (0, 1] as number" read whole here."""
    assert error_of(tmp_path, campaign_text("stage[0].input", " ", [STAGE])) \
        == 'stage[0].input: expected a non-empty string, got " "'
    assert error_of(tmp_path, campaign_text("defaults.ready", 0, [STAGE])) \
        == "defaults.ready: expected a fraction in (0, 1] such as 0.99, got 0"
    assert error_of(tmp_path, campaign_text("stage[0].split", "nfiles(3)", [STAGE])) \
        == ('stage[0].split: expected "all", "drainingn(N)" with N >= 1, or "list(a,b,c)", '
            'got "nfiles(3)"')


def test_valid_file_parses_from_text() -> None:
    """A daemon gets the text and the path it came from; stages come back in ``after`` order."""
    text = campaign_text("name", "c", [{**STAGE, "name": "b", "after": ["a"]}, STAGE])
    cfg = parse_campaign(text, Path("/x/c.toml"))
    assert [s.name for s in cfg.ordered()] == ["a", "b"]
    assert cfg.source == Path("/x/c.toml")
    assert json.loads(json.dumps(cfg.stage[0].after)) == ["a"]
