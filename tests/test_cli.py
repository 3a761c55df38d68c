"""The ``sandpool`` command's surface: --version, and help on every option and subcommand."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.cli import build_parser

ROOT = Path(__file__).parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m api.cli ARGS`` with the venv's interpreter, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "api.cli", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) pair, the top-level parser first.

    argparse keeps subcommands only in private attributes (``_actions``,
    ``_choices_actions``); a test may read them, since an argparse change that
    moved them would fail here loudly rather than pass silently.
    """
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, (*path, name))


PATHS = [path for path, _ in commands(build_parser())]


def test_version_is_the_distributions() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sandpool {pyproject['project']['version']}\n"


def test_every_command_is_reachable() -> None:
    assert {" ".join(path) for path in PATHS} >= {
        "", "serve", "run", "status", "config", "config check", "image", "image build"}


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "sandpool")
def test_every_option_and_subcommand_has_help(path: tuple[str, ...]) -> None:
    parser = dict(commands(build_parser()))[path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {choice.dest: choice.help for choice in action._choices_actions}
            assert set(described) == set(action.choices), path
            for name, text in described.items():
                assert text, f"subcommand {' '.join((*path, name))} has no help text"
        else:
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{path}: {name} has no help"
            assert action.help != argparse.SUPPRESS, f"{path}: {name} is hidden"
    done = cli(*path, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {' '.join(('sandpool', *path))}")
    for action in parser._actions:
        for option in action.option_strings:
            assert option in done.stdout, f"{option} missing from {' '.join(path)} --help"
