"""The README's commands are commands that exist: every ``kvstore`` invocation it shows, in
inline code or in a shell block, names a real command and only options that command takes
(the README once showed ``kvstore pin ... --tier G2``, which failed with "No such option")."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from kvstore.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def shown_commands() -> list[tuple[int, str]]:
    """``(line, text)`` of each ``kvstore ...`` invocation in the README."""
    found: list[tuple[int, str]] = []
    in_shell = False
    for number, line in enumerate(README.splitlines(), start=1):
        if line.startswith("```"):
            in_shell = line.strip() in ("```bash", "```sh", "```console")
            continue
        if in_shell:
            text = line.split("#", 1)[0]
            match = re.search(r"(?:^|\s|/)kvstore\s+([a-z].*)$", text)
            if match:
                found.append((number, match.group(1)))
            continue
        for span in re.findall(r"`([^`]*)`", line):
            match = re.search(r"(?:^|\s|/)kvstore\s+([a-z][a-z/-]*(?:\s.*)?)$", span)
            # A row written "pin/unpin/evict" would be checked against none of them.
            if match:
                found.append((number, match.group(1)))
    return found


def option_names(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


SHOWN = shown_commands()


def test_the_readme_shows_commands() -> None:
    assert len(SHOWN) > 40


@pytest.mark.parametrize(("line", "text"), SHOWN, ids=[f"line{n}" for n, _ in SHOWN])
def test_each_command_the_readme_shows_exists_with_its_options(line: int, text: str) -> None:
    words = text.split()
    assert isinstance(main, click.Group)
    command = main.commands.get(words[0])
    assert command is not None, f"README line {line}: no command `kvstore {words[0]}`"
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    unknown = sorted(options - option_names(command))
    assert not unknown, f"README line {line}: `kvstore {words[0]}` has no {unknown}"
