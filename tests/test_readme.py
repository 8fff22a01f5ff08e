"""The Python code blocks of the README and of every page of the docs site (docs/**/*.md) run, so none goes stale.

Every ```python block runs as a script in a fresh process (one rank, CPU), and a ```diff block (the README's
"Use it") runs as the file it produces (its ``+`` and context lines). A block that needs more than one CPU
process is marked by an HTML comment on the line before its fence, which the rendered page does not show:

    <!-- readme-test: skip="needs a GPU" names="train" -->    compiled, and every name it uses must be
                                                             defined, imported or listed in names; not run
    <!-- readme-test: launch="1" -->                         run as rank 0 of a one-rank torchrun-style job
                                                             (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
    <!-- readme-test: launch="2" expect="2 ranks" -->        run by launch/torchrun.sh --cpu --nproc 2 (two
                                                             Gloo processes); its output must contain expect

A skipped block is reported with its reason (pytest -rs). The README's relative links must lead to files (and
headings) that exist, the README stays a landing page (at most README_LINES lines), and every public name has
a page in the API reference (docs/api/, generated from its docstring by mkdocstrings); `make docs` checks the
site's own links and anchors (mkdocs build --strict).
"""

from __future__ import annotations

import ast
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
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
README_LINES = 200
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:(?P<attrs>.*?)-->\s*$")
ATTR = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    attrs: dict[str, str] = field(default_factory=dict)
    page: str = "README.md"  # relative to the repository root

    @property
    def id(self) -> str:
        where = "" if self.page == "README.md" else self.page.removeprefix("docs/").removesuffix(".md") + ":"
        return f"{where}line{self.line}_{self.language}"

    @property
    def where(self) -> str:
        return f"{self.page} block at line {self.line}"


def readme_blocks(text: str, page: str = "README.md") -> list[Block]:
    """The python and diff blocks of a page, each with the attributes of the marker line before it."""
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
            blocks.append(Block(i + 1, language, "\n".join(body) + "\n", attrs, page))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in readme_blocks(page.read_text(), page.relative_to(REPO).as_posix())]


def test_the_pages_have_python_blocks_and_the_parser_reads_markers() -> None:
    assert any(b.language == "python" for b in BLOCKS) and any(b.language == "diff" for b in BLOCKS)
    assert any(b.page == "README.md" for b in BLOCKS) and any(b.page.startswith("docs/guides/") for b in BLOCKS)
    parsed = readme_blocks('<!-- readme-test: skip="needs a GPU" names="a b" -->\n```python\na()\n```\n'
                           '<!-- readme-test: launch="2" expect="2 ranks" -->\n'
                           '```diff\n import x\n+import y\n-import z\n```\n')
    assert [(b.language, b.code, b.attrs) for b in parsed] == [
        ("python", "a()\n", {"skip": "needs a GPU", "names": "a b"}),
        ("diff", "import x\nimport y\n", {"launch": "2", "expect": "2 ranks"}),
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
    compile(block.code, f"{block.page}:{block.line}", "exec")
    if "skip" in block.attrs:
        problems = _undefined_names(block.code, block.attrs.get("names", "").split())
        assert not problems, f"{block.where} uses undefined names:\n{problems}"
        pytest.skip(f"{block.page} line {block.line}: {block.attrs['skip']}")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, on any machine
    command = [sys.executable, str(script)]
    launch = block.attrs.get("launch", "")
    if launch == "1":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    elif launch:  # W CPU processes on Gloo, started as the README starts them
        env["PYTHON"] = sys.executable
        command = ["bash", str(REPO / "launch" / "torchrun.sh"), "--cpu", "--nproc", launch, str(script)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"{block.where} failed:\n{block.code}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    expected = block.attrs.get("expect", "")
    assert expected in done.stdout, (f"{block.where} ran, but its output lacks {expected!r}:\n"
                                     f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def test_the_readme_script_runs_on_two_ranks() -> None:
    """The README's "Use it" is a complete script, and the suite runs it as users do: 2 ranks under the launcher."""
    use_it = next(b for b in BLOCKS if b.page == "README.md" and b.language == "diff")
    assert use_it.attrs.get("launch") == "2" and "skip" not in use_it.attrs, use_it.attrs
    for needed in ("init_process_group", "convert_model", "DistributedDataParallel", "destroy_process_group"):
        assert needed in use_it.code, f"README.md's script (line {use_it.line}) lacks {needed}"
    home = next(b for b in BLOCKS if b.page == "docs/index.md" and b.language == "diff")
    assert home.code == use_it.code, "docs/index.md's Use it must be the README's script, which the suite runs"


def _outside_code_fences(text: str) -> str:
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def _outside_code(text: str) -> str:
    """The text without fenced blocks and inline code spans, where a link is not a link."""
    return re.sub(r"`[^`\n]*`", "", _outside_code_fences(text))


def _github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (lower case, punctuation dropped, - for space)."""
    headings = re.findall(r"^#{1,6} (.+?)\s*$", _outside_code_fences(text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_links_lead_to_files_and_headings_that_exist() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", _outside_code(README.read_text()))
    local = [link for link in links if not re.match(r"^[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local), "the README links into the docs"
    broken = []
    for link in local:
        path, _, anchor = link.partition("#")
        target = README if not path else (REPO / path)
        if not target.exists():
            broken.append(f"{link}: no file {path}")
        elif anchor and target.suffix == ".md" and anchor not in _github_anchors(target.read_text()):
            broken.append(f"{link}: no heading with the anchor #{anchor} in {path or 'README.md'}")
    assert not broken, "README.md has broken links:\n" + "\n".join(broken)


def test_the_github_anchor_rule() -> None:
    text = "## Speed under torch.compile (CPU, W=2)\n```\n# not a heading\n```\n# `make demo`: a/b\n"
    assert _github_anchors(text) == {"speed-under-torchcompile-cpu-w2", "make-demo-ab"}


def test_the_readme_is_a_landing_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_LINES, (f"README.md has {lines} lines, more than {README_LINES}: move the detail into a "
                                   "page of docs/ and link it")


def test_every_public_name_has_an_api_page() -> None:
    tree = ast.parse((REPO / "syncnorm" / "__init__.py").read_text())
    public = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "__all__" for t in node.targets))
    documented = set(re.findall(r"^::: ([\w.]+)\s*$", "\n".join(p.read_text() for p in (REPO / "docs" / "api").glob(
        "*.md")), flags=re.M))
    wanted = {f"syncnorm.{name}" for name in public} | {"syncnorm.lightning.SyncNormLayerSync"}
    assert wanted <= documented, f"public names without an API page in docs/api/: {sorted(wanted - documented)}"
