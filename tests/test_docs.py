"""README.md and docs/: every relative link, image and anchor resolves, and the README stays short."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

from conftest import REPO

README_LIMIT = 12_500  # bytes: a README a newcomer reads in five minutes; the rest lives in docs/

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
_HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files(root: Path = REPO) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose_lines(path: Path):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
        else:
            yield number, line


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, every character but letters, marks, digits,
    '_', '-' and spaces dropped, each space a '-'. A link's text and a code span's content count as text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file: its headings' (a repeated one gets -1, -2, …) and explicit <a id/name>."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        found.update(_HTML_ANCHOR.findall(line))
        heading = _HEADING.match(line)
        if heading:
            slug = github_anchor(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(files: list[Path], root: Path = REPO) -> list[str]:
    """'file:line: target (why)' for every relative link or image in files whose file or anchor is missing."""
    broken = []
    cache: dict[Path, set[str]] = {}
    for path in files:
        for number, line in prose_lines(path):
            for target in _LINK.findall(_CODE_SPAN.sub("", line)):  # `[a](b)` in a code span is no link
                if not target or _SCHEME.match(target):
                    continue  # http(s)://, mailto: and the like are not checked
                file_part, _, fragment = target.partition("#")
                where = f"{path.relative_to(root)}:{number}: {target}"
                linked = (path.parent / unquote(file_part)).resolve() if file_part else path
                if not linked.exists():
                    broken.append(f"{where} (no such file: {linked})")
                    continue
                if not fragment:
                    continue
                if linked.suffix != ".md" or not linked.is_file():
                    broken.append(f"{where} (an anchor into {linked.name}, which is not a markdown file)")
                    continue
                if linked not in cache:
                    cache[linked] = anchors(linked)
                if unquote(fragment) not in cache[linked]:
                    broken.append(f"{where} (no heading or <a id> gives #{fragment} in {linked.name})")
    return broken


def test_every_relative_link_and_anchor_resolves():
    files = markdown_files()
    assert (REPO / "docs" / "README.md") in files  # the index of docs/ is checked with the rest
    broken = broken_links(files)
    assert not broken, f"{len(broken)} broken link(s) in README.md and docs/:\n" + "\n".join(broken)


def test_readme_is_short():
    size = (REPO / "README.md").stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move the detail into docs/"


def test_anchors_follow_githubs_rule():
    """Headings of these docs, and the symbols GitHub drops, with the anchors GitHub gives them."""
    assert github_anchor("Zero-shot tasks: `eval.tasks`") == "zero-shot-tasks-evaltasks"
    assert github_anchor("Block-wise reconstruction (`compress.update=block`)") == (
        "block-wise-reconstruction-compressupdateblock")
    assert github_anchor("SmolLM2, a real pretrained LLM") == "smollm2-a-real-pretrained-llm"
    assert github_anchor("On a GPU (one NVIDIA H100 80GB, torch 2.11 + CUDA 13.0, transformers 5.17)") == (
        "on-a-gpu-one-nvidia-h100-80gb-torch-211--cuda-130-transformers-517")
    assert github_anchor("Methods × ranks — ≥ 2, café_au_lait") == "methods--ranks---2-café_au_lait"


def test_the_check_finds_every_kind_of_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Title\n\n## Part\n\n## Part\n\n<a id=\"custom\"></a>\n\n"
        "[ok](#part) [ok](#part-1) [ok](#custom) [ok](docs/page.md#page-heading) ![ok](img.png)\n"
        "[web](https://example.com/#x) [mail](mailto:a@b.c) `[code](#not-a-link)`\n"
        "```\n[fenced](#not-a-link-either)\n# not a heading\n```\n"
        "[bad](#part-2) [bad](docs/none.md) ![bad](missing.png) [bad](docs/page.md#nope) [bad](#not-a-heading)\n",
        encoding="utf-8")
    (tmp_path / "docs" / "page.md").write_text("# Page heading\n\n[ok](../README.md#title)\n", encoding="utf-8")
    broken = broken_links(markdown_files(tmp_path), root=tmp_path)
    assert [b.split(" (")[0] for b in broken] == [
        "README.md:15: #part-2", "README.md:15: docs/none.md", "README.md:15: missing.png",
        "README.md:15: docs/page.md#nope", "README.md:15: #not-a-heading"]
