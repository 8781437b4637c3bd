"""edge-train's defaults are the bundled model's recipe, and scripts/train_default.sh records the
same recipe flag by flag."""

from __future__ import annotations

import io
import shlex
from dataclasses import fields
from pathlib import Path

from training.cli import parse_arguments
from training.recipe import DEFAULT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh"


def _script_options() -> dict[str, list[str]]:
    """The script's one ``edge-train`` command, as ``{option: [values]}``."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    lines = [x for x in text.splitlines() if x.strip().startswith("edge-train ")]
    assert len(lines) == 1, f"{SCRIPT.name} should run edge-train once, not {len(lines)} times"
    options: dict[str, list[str]] = {}
    current = None
    for word in shlex.split(lines[0].split("|", 1)[0])[1:]:
        if word.startswith("--"):
            current = options.setdefault(word[2:], [])
        elif current is not None:
            current.append(word)
    return options


def test_edge_train_defaults_are_the_recipe():
    args = parse_arguments(["data", "--output", "run"], io.StringIO(), io.StringIO())
    for f in fields(DEFAULT):
        assert getattr(args, f.name) == getattr(DEFAULT, f.name), f.name


def test_the_default_model_script_records_every_option_of_the_recipe():
    options = _script_options()
    for f in fields(DEFAULT):
        option = f.name.replace("_", "-")
        assert option in options, f"{SCRIPT.name} does not record --{option}"
        default = getattr(DEFAULT, f.name)
        if isinstance(default, tuple):
            recorded = tuple(type(default[0])(v) for v in options[option])
        else:
            recorded = type(default)(options[option][0])
        assert recorded == default, option
