"""The fenced bash blocks of one section of README.md, so that CI runs exactly what a newcomer reads.

    python .ci/readme_blocks.py README.md "Quick start" count   -> how many bash blocks the section holds
    python .ci/readme_blocks.py README.md "Quick start" 1       -> the first block's text, as written

The section runs from its `## <title>` heading (the title may be followed by more words, e.g. a
parenthesis) to the next heading of level 2 or higher. Exits with status 2 and a message when the section
or the block does not exist, so that a README edit cannot silently drop a command from CI.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path


def section_lines(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    heading = re.compile(rf"^##\s+{re.escape(title)}\b")
    starts = [i for i, line in enumerate(lines) if heading.match(line)]
    if len(starts) != 1:
        raise LookupError(f"expected one '## {title}' heading, found {len(starts)}")
    body = []
    for line in lines[starts[0] + 1:]:
        if re.match(r"^#{1,2}\s", line):
            break
        body.append(line)
    return body


def bash_blocks(text: str, title: str) -> list[str]:
    """The contents of the ```bash (or ```sh) fences of the section, in order, without the fences."""
    blocks, current = [], None
    for line in section_lines(text, title):
        if current is None:
            if re.match(r"^```(bash|sh|shell)\s*$", line):
                current = []
        elif line.strip() == "```":
            blocks.append("\n".join(current) + "\n")
            current = None
        else:
            current.append(line)
    if current is not None:
        raise LookupError(f"an unclosed ```bash fence in section {title!r}")
    return blocks


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, title, which = argv
    try:
        blocks = bash_blocks(Path(path).read_text(encoding="utf-8"), title)
    except (OSError, LookupError) as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 2
    if which == "count":
        print(len(blocks))
        return 0
    if not which.isdigit() or not 1 <= int(which) <= len(blocks):
        print(f"{path}: section {title!r} has {len(blocks)} bash block(s), no block {which!r}", file=sys.stderr)
        return 2
    sys.stdout.write(blocks[int(which) - 1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
