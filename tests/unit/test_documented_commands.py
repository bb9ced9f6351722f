"""Every job command the README and docs show parses and validates as written (``--print-config``):
a renamed field, a moved preset or a wrong flag in the docs fails here. The commands that train run
for real, as subprocesses, in tests/integration (test_commands.py, test_job_submit.py)."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest
from support import REPO

DOCUMENTS = ["README.md", *sorted(str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md")),
             "cluster/README.md"]
# What the documents' shell variables stand for when the commands are checked.
SHELL_VARIABLES = {"$ENCODER": "outputs/checkpoints/local-tiny-0/ssamba_encoder.pt", '"$PWD"': str(REPO),
                   "$PWD": str(REPO)}


def fenced_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks, with backslash continuations joined."""
    lines, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def job_commands() -> list[tuple[str, str, list[str]]]:
    """``(document, job, arguments)`` of every ``python -m pipeline.<job>`` in a code block, also
    behind ``ray job submit ... --``; optional parts of a synopsis (``[--set key=value ...]``) dropped."""
    found = []
    for document in DOCUMENTS:
        for line in fenced_lines((REPO / document).read_text()):
            match = re.match(r"(?:ray job submit .* -- )?(?:\.venv/bin/)?python -m pipeline\.(\w+)(.*)", line.strip())
            if match is None:
                continue
            arguments = re.sub(r"\[[^\]]*\]", "", match.group(2))
            for variable, value in SHELL_VARIABLES.items():
                arguments = arguments.replace(variable, value)
            found.append((document, match.group(1), shlex.split(arguments, comments=True)))
    return found


COMMANDS = job_commands()


def test_the_documents_show_every_job():
    assert {job for _, job, _ in COMMANDS} >= {"featurize", "pretrain", "finetune", "tune", "embed", "runs"}
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("document,job,arguments", COMMANDS,
                         ids=[f"{document}:{job}:{index}" for index, (document, job, _) in enumerate(COMMANDS)])
def test_documented_command_validates(document, job, arguments, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    main = importlib.import_module(f"pipeline.{job}").main
    if job == "runs":  # reads a store: an empty one here, so the command parses and names what is missing
        monkeypatch.setenv("SSAMBA_BASE_DIR", str(tmp_path))
        if "--experiment" not in arguments:  # the experiments of the store
            assert main(arguments) == 0 and "Default" in capsys.readouterr().out
            return
        assert main(arguments) == 2 and "no experiment" in capsys.readouterr().err
        return
    if "--help" in arguments:
        with pytest.raises(SystemExit) as done:
            main(arguments)
        assert done.value.code == 0
        return
    code = main([*arguments, "--print-config"])
    assert code == 0, f"{document}: python -m pipeline.{job} {shlex.join(arguments)}\n{capsys.readouterr().err}"
