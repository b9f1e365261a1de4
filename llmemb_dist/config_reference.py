"""docs/configuration.md, written from `config.key_help()` so that the reference is the code's own help:

    python -m llmemb_dist.config_reference > docs/configuration.md

`tests/test_docs.py` fails while the committed file differs from what this prints.
"""
from __future__ import annotations

import sys

from llmemb_dist.config import key_help

COMMAND = "python -m llmemb_dist.config_reference > docs/configuration.md"

INTRO = f"""\
# Configuration reference

Generated from the help in the field metadata of `llmemb_dist/config.py`; edit the help there, not this
file, and regenerate it with `{COMMAND}`.

Every stage reads one YAML file (`configs/default.yaml` is the embedded default) plus `dotted.key=value`
overrides on the command line (`python launch/rat.py configs/default.yaml rat.backbone=gru4rec`); a key
left out keeps the default below. `llmemb <stage> --help` prints the same list. Unknown keys, wrong
types, values outside their range or outside a closed set, and names that would become unsafe paths are
refused with the key's name before Ray starts (exit code 2)."""


def _code(text: str) -> str:
    """Text as a code span in a table cell: only `|`, which would end the cell, needs its escape there."""
    return f"`{text.replace('|', chr(92) + '|')}`"


def _prose(text: str) -> str:
    """Help text as a table cell: outside its code spans `<` would open an HTML tag and `*` emphasis."""
    parts = text.split("`")
    return "".join(_code(part) if i % 2 else part.replace("|", "\\|").replace("<", "\\<").replace("*", "\\*")
                   for i, part in enumerate(parts))


def markdown() -> str:
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    for row in key_help():
        sections.setdefault(row[0].rpartition(".")[0], []).append(row)
    lines = [INTRO]
    for section, rows in sections.items():
        lines += ["", f"## `{section}`" if section else "## Top level", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{key}` | {_code(kind)} | {_code(default)} | {_prose(meaning)} |"
                  for key, kind, default, meaning in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
