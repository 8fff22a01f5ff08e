"""The README's Python code blocks run, so they cannot go stale.

Every ```python block runs as a script in a fresh process (one rank, CPU), and the ```diff block of "Use it"
runs as the file it produces (its ``+`` and context lines). A block that needs more than this machine gives
is marked by an HTML comment on the line before its fence, which the rendered README does not show:

    <!-- readme-test: skip="needs a GPU" names="train" -->    compiled, and every name it uses must be
                                                             defined, imported or listed in names; not run
    <!-- readme-test: launch="1" -->                         run as rank 0 of a one-rank torchrun-style job
                                                             (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

A skipped block is reported with its reason (pytest -rs).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:(?P<attrs>.*?)-->\s*$")
ATTR = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"line{self.line}_{self.language}"


def readme_blocks(text: str) -> list[Block]:
    """The python and diff blocks of the README, each with the attributes of the marker line before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        attrs = dict(ATTR.findall(marker.group("attrs"))) if marker else {}
        language = opened.group(1)
        body = lines[i + 1:end]
        if language == "diff":  # the file after the change: context and added lines
            body = [line[1:] for line in body if line[:1] in (" ", "+", "")]
        if language in ("python", "diff"):
            blocks.append(Block(i + 1, language, "\n".join(body) + "\n", attrs))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_the_readme_has_python_blocks_and_the_parser_reads_markers() -> None:
    assert any(b.language == "python" for b in BLOCKS) and any(b.language == "diff" for b in BLOCKS)
    parsed = readme_blocks('<!-- readme-test: skip="needs a GPU" names="a b" -->\n```python\na()\n```\n'
                           '```diff\n import x\n+import y\n-import z\n```\n')
    assert [(b.language, b.code, b.attrs) for b in parsed] == [
        ("python", "a()\n", {"skip": "needs a GPU", "names": "a b"}),
        ("diff", "import x\nimport y\n", {}),
    ]


def _undefined_names(code: str, allowed: list[str]) -> str:
    """ruff's F821 (undefined name) on the block, with the user-supplied names allowed."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "F821", "--config",
         f"builtins = {allowed!r}".replace("'", '"'), "--output-format", "concise", "--stdin-filename",
         "block.py", "-"],
        input=code, capture_output=True, text=True, timeout=60,
    )
    return "" if done.returncode == 0 else done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, tmp_path: Path) -> None:
    compile(block.code, f"README.md:{block.line}", "exec")
    if "skip" in block.attrs:
        problems = _undefined_names(block.code, block.attrs.get("names", "").split())
        assert not problems, f"README.md block at line {block.line} uses undefined names:\n{problems}"
        pytest.skip(f"README.md line {block.line}: {block.attrs['skip']}")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, on any machine
    if block.attrs.get("launch") == "1":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, (f"README.md block at line {block.line} failed:\n{block.code}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
