"""The README's commands run as written: every ``vfmtok ...`` and ``accelerate launch ... -m vfmtok ...`` line
of its shell blocks parses with the real command line, and every config file it names exists. (What can run on this
machine runs in its own test: the quickstart in test_quickstart.py, training, extraction and sampling in theirs.)"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vfmtok.pipelines.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Shell commands of the README's ```bash blocks, continuation lines joined, comments removed."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def cli_arguments(command: str) -> list[str] | None:
    """The arguments the vfmtok command line gets from ``command``, or None for other programs."""
    words = shlex.split(command.split("&&")[-1].strip())
    if words[:1] == ["vfmtok"]:
        return words[1:]
    if words[:2] == ["accelerate", "launch"] and "-m" in words:
        module = words[words.index("-m") + 1]
        assert module == "vfmtok", f"{command}: the command line is `-m vfmtok`, not `-m {module}`"
        return words[words.index("-m") + 2:]
    if words[:3] == ["python", "-m", "vfmtok"]:
        return words[3:]
    return None


COMMANDS = [c for c in readme_commands() if cli_arguments(c) is not None]


def test_the_readme_has_the_set_up_commands_first():
    first = readme_commands()[:3]
    ci_install = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line)
    assert first[0].startswith("python3 -m venv") and first[0] == ci_install  # CI installs as the README says
    assert 'pip install -e ".[test,demo]"' in first[0]  # the demo extra: its gradio_client test runs in CI
    assert first[1] == "vfmtok quickstart"
    assert first[2] == "python -m pytest -q"
    assert len(COMMANDS) >= 15  # the usage sections really are checked


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses_and_names_existing_configs(command):
    arguments = cli_arguments(command)
    try:
        build_parser().parse_args(arguments)
    except SystemExit as exit_:  # argparse's way of refusing arguments
        pytest.fail(f"README command does not parse ({exit_.code}): {command}")
    for word in arguments:
        if word.startswith("configs/"):
            assert (ROOT / word).is_file(), f"README names a config that does not exist: {word}"
