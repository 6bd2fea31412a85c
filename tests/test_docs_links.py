"""Every relative link in README.md and docs/*.md points at a file that exists, and every `#anchor` at a heading of
the page it names (GitHub's heading ids). The front page keeps the two commands CI's `.ci/run` runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_pages(root=ROOT):
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(text, blank_code=True):
    """(line number, line) outside fenced code blocks, with inline code spans blanked unless told otherwise."""
    fenced = False
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r"`[^`]*`", "``", line) if blank_code else line


def heading_ids(text):
    """GitHub's ids for a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    ids, seen = set(), {}
    for _, line in prose_lines(text, blank_code=False):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = re.sub(r"`", "", match[1]).lower()
        base = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.add(base if count == 0 else f"{base}-{count}")
    return ids


def broken_links(pages, root=ROOT):
    """'page:line: target (why)' for each relative link or anchor of the pages that does not resolve."""
    broken = []
    for page in pages:
        text = page.read_text()
        for number, line in prose_lines(text):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                    continue
                path, _, anchor = target.partition("#")
                where = f"{page.relative_to(root)}:{number}: {target}"
                file = (page.parent / path).resolve() if path else page
                if not file.exists():
                    broken.append(f"{where} (no file {path})")
                elif anchor:
                    if file.suffix != ".md":
                        broken.append(f"{where} (an anchor into a file that is not markdown)")
                    elif anchor not in heading_ids(file.read_text()):
                        broken.append(f"{where} (no heading #{anchor} in {file.name})")
    return broken


def test_every_link_and_anchor_resolves():
    pages = markdown_pages()
    assert len(pages) >= 8, "README.md and the docs/ pages"
    assert broken_links(pages) == []


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Title\n\n[ok](docs/a.md#a-b-c-d) [missing file](docs/none.md) [bad anchor](docs/a.md#nowhere)\n"
        "`[in code](nowhere.md)`\n```\n[in a fence](nowhere.md)\n```\n[web](https://example.org/x.md)\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# A: `b` (c) d\n\n[self](#a-b-c-d) [twice](#twice-1) [up](../README.md#title)\n\n## Twice\n\n## Twice\n")
    broken = broken_links(markdown_pages(tmp_path), tmp_path)
    assert broken == ["README.md:3: docs/none.md (no file docs/none.md)",
                      "README.md:3: docs/a.md#nowhere (no heading #nowhere in a.md)"]


def test_front_page_holds_the_two_commands():
    """`.ci/run` runs `make test`; the front page is where a newcomer finds it and `make demo`."""
    readme = (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for command in ("make demo", "make test"):
        assert f"\n{command} " in readme, command
    assert len(readme.split("\n")) < 120, "the front page stays short; details go to docs/"


def test_export_help_and_the_evaluation_page_agree_on_lmms_eval():
    """tools/convert_checkpoint.py's export help (its layouts text) and docs/evaluation.md name the same lmms-eval
    models for the two exports, and neither says lmms-eval needs a HiMix entry of its own."""
    help_text = " ".join((ROOT / "tools" / "convert_checkpoint.py").read_text().split())
    page = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())
    for text in (help_text, page):
        assert "--model huggingface --model_args pretrained=" in text and "trust_remote_code=True" in text
        assert "--model llava_hf --model_args pretrained=" in text and "make test-lmms-eval" in text
        assert "lmms-eval and VLMEvalKit have no HiMix entry" not in text
