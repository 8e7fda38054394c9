"""The README's command lines and option tables name only flags that their command has."""

from __future__ import annotations

import re
from pathlib import Path

from typer.main import get_command

from sdtune.cli import app

README = Path(__file__).parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
COMMAND_LINE = re.compile(r"\bsdtune (train|sample|explain|export|extract|merge|evaluate|compare|sweep|methods|datasets|env)\b(.*)")

# the sections whose option tables are one command's (the methods' tables give train's flags)
TABLE_COMMANDS = {
    "### `sdtune train`": "train",
    "#### Training options: accumulation, LR schedules, clipping, EMA, checkpoints and resume": "train",
    "### Training options": "train",
    "### `sdtune sample`": "sample",
    "## Photo sets": "train",
    "## Datasets": "train",
    "## Methods": "train",
    "## Evaluate and compare": "evaluate",
    "#### `sdtune extract`: any adapter as a LoRA of a chosen rank": "extract",
}


def command_flags() -> dict[str, set[str]]:
    group = get_command(app)
    return {
        name: {opt for param in command.params for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--")}
        for name, command in group.commands.items()
    }


def readme_command_lines() -> list[tuple[int, str, str]]:
    """(line number, command, the rest of its line) for every `sdtune CMD ...` in code blocks and inline code."""
    lines = README.read_text(encoding="utf-8").splitlines()
    found, in_code, joined, start = [], False, "", 0
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            joined, start = (joined + " " + line, start) if joined else (line, number)
            if line.endswith("\\"):  # a continued shell line
                continue
            texts, joined = [joined.split(" # ")[0]], ""
        else:
            texts, start = re.findall(r"`([^`]*)`", line), number
        for text in texts:
            for match in COMMAND_LINE.finditer(text):
                found.append((start, match.group(1), match.group(2)))
    return found


def readme_table_flags() -> list[tuple[int, str, str]]:
    """(line number, command, flag) for the flags of the option tables' first two columns, by section."""
    found, command = [], None
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#"):
            command = next((c for heading, c in TABLE_COMMANDS.items() if line == heading or line.startswith(heading + " ")), None)
            if line.startswith("### `") and line.split("`")[1] in ("atoms", "bitfit", "difffit", "full", "gift", "lora", "oft"):
                command = "train"  # a method's section
        elif command and (line.startswith("| `--") or re.match(r"\| `\w+` \| `--", line)):
            cells = line.split(" | ")[:2]
            found += [(number, command, flag) for flag in FLAG.findall(" ".join(cells))]
        elif command and re.match(r" *- (\*\*)?`--", line):  # a bullet that opens with its flag
            found += [(number, command, flag) for flag in FLAG.findall(line.split("`")[1])]
    return found


def test_the_readme_names_commands_and_tables_to_check():
    commands = {command for _, command, _ in readme_command_lines()}
    assert commands >= {"train", "sample", "export", "extract", "merge", "evaluate", "compare", "sweep", "methods", "datasets", "explain"}
    tables = {command for _, command, _ in readme_table_flags()}
    assert tables == {"train", "sample", "evaluate", "extract"}


def test_every_readme_command_line_uses_flags_its_command_has():
    flags = command_flags()
    unknown = [
        f"line {number}: sdtune {command} has no {flag}"
        for number, command, rest in readme_command_lines()
        for flag in sorted(set(FLAG.findall(rest)) - flags[command] - {"--help"})
    ]
    assert not unknown, unknown


def test_every_readme_option_table_flag_is_its_commands():
    flags = command_flags()
    unknown = [f"line {number}: sdtune {command} {flag}" for number, command, flag in readme_table_flags() if flag not in flags[command]]
    assert not unknown, unknown


def kohya_table() -> dict[str, str]:
    """The "Coming from kohya-ss" table: kohya-ss flag -> its sdtune cell, backticks left out."""
    rows, inside = {}, False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line == "## Coming from kohya-ss"
        elif inside and (row := re.fullmatch(r"\| `(--\w+)` \| (.*) \|", line)):
            rows[row[1]] = row[2].replace("`", "")
    return rows


def test_the_kohya_table_is_what_the_cli_says_and_names_flags_sdtune_has():
    """The README's kohya-ss table holds the rows `sdtune train` adds to its refusal of a kohya-ss flag
    (`kohya_flags.KOHYA_FLAGS`), word for word; each flag it names is train's, export's where the row names
    `sdtune export`, or a prompt line's option where it names those; no kohya-ss flag it lists is one of train's."""
    from sdtune.data import PROMPT_OPTIONS
    from sdtune.kohya_flags import KOHYA_FLAGS

    table = kohya_table()
    assert table == {kohya: instead.replace("`", "") for kohya, instead in KOHYA_FLAGS.items()}
    flags = command_flags()
    unknown = []
    for kohya, instead in table.items():
        has = flags["train"] | (flags["export"] if "sdtune export" in instead else set())
        if "a line's" in instead:
            has |= {f"--{option}" for option in PROMPT_OPTIONS}
        unknown += [f"{kohya}: {flag}" for flag in FLAG.findall(instead) if flag not in has]
        assert kohya not in flags["train"], f"{kohya} needs no row: sdtune train has it"
    assert not unknown, unknown
