"""edge-train's defaults are the bundled model's recipe, and scripts/train_default.sh records the
same recipe flag by flag, for each of its members."""

from __future__ import annotations

import re
import shlex
from dataclasses import fields
from pathlib import Path

from training.cli import build_parser
from training.recipe import DEFAULT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh"


def _script() -> str:
    return SCRIPT.read_text().replace("\\\n", " ")


def _script_flags() -> dict[str, str]:
    """The script's one ``edge-train`` command, as ``{option: value}`` (the first value)."""
    line = next(x for x in _script().splitlines() if x.strip().startswith("edge-train "))
    words = shlex.split(line.split("|", 1)[0])
    return {
        w[2:]: words[i + 1]
        for i, w in enumerate(words)
        if w.startswith("--") and i + 1 < len(words)
    }


def _members() -> list[tuple[str, str]]:
    """``member FOLDER BACKBONE`` calls, in order: the backbone is the command's ``$2``."""
    return re.findall(r"^member (\S+) (\S+)(?: &| *$)", _script(), flags=re.MULTILINE)


def test_edge_train_defaults_are_the_recipe():
    args = build_parser().parse_args(["data", "--output", "run"])
    for f in fields(DEFAULT):
        assert getattr(args, f.name) == getattr(DEFAULT, f.name), f.name


def test_the_default_model_script_trains_each_member_with_the_recipe():
    flags = _script_flags()
    assert [backbone for _, backbone in _members()] == [DEFAULT.backbone, "efficientnet-lite2"]
    assert flags["backbone"] == "$2"
    for f in fields(DEFAULT):
        if f.name == "backbone":
            continue
        option = f.name.replace("_", "-")
        recorded = flags.get(option, "0" if f.name == "scanner_style" else None)
        assert recorded is not None, f"{SCRIPT.name} does not record --{option}"
        assert type(getattr(DEFAULT, f.name))(recorded) == getattr(DEFAULT, f.name), option
