"""``recbole_mm/cli.py`` is the one dispatcher: every sub-command registers through its module's
``register(subparsers)``, library modules never import the CLI, and one runner turns the
package's usage errors into one line and exit status 2."""

from __future__ import annotations

import ast
import pathlib

import pytest

import recbole_mm
from recbole_mm.cli import build_parser, run_subcommand

PACKAGE = pathlib.Path(recbole_mm.__file__).parent
COMMANDS = ["finetune", "pretrain", "preprocess", "merge", "extract-text", "extract-image", "download-images",
            "prepare", "recommend", "leaderboard", "transfer", "import-checkpoint"]
ENTRY_POINTS = {"cli.py", "leaderboard/__main__.py"}  # python -m recbole_mm.leaderboard ...


def test_every_sub_command_is_registered_once_in_order():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS
    for name in COMMANDS[2:]:
        assert callable(sub.choices[name].get_default("func")), name


def test_no_library_module_imports_the_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) else [])
            if "recbole_mm.cli" in names:
                offenders.append(rel)
    assert not offenders


@pytest.mark.parametrize("error", ["PipelineError", "DataValidationError", "LeaderboardError", "RecommendError",
                                   "ConfigError", "CheckpointError", "UsageError", "FileNotFoundError"])
def test_usage_errors_are_one_line_and_exit_2(error, capsys):
    from recbole_mm.cli import _usage_errors

    cls = next(c for c in _usage_errors() if c.__name__ == error)

    def fail(_):
        raise cls("bad input: x.inter:3")

    args = build_parser().parse_args(["merge", "--output", "o", "d"])
    assert run_subcommand(fail, args) == 2
    assert capsys.readouterr().err == "recbole-mm merge: error: bad input: x.inter:3\n"


def test_other_errors_keep_their_traceback():
    args = build_parser().parse_args(["merge", "--output", "o", "d"])
    with pytest.raises(ZeroDivisionError):
        run_subcommand(lambda a: 1 / 0, args)
