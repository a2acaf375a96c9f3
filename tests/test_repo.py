"""The repository's promises to users and CI: README commands, CI script, licence, cheap import."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's first code block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    assert block, "README.md has no code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_the_demo_and_test_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.index("```")
    assert text.count("\n## ", 0, first_block) == 0, "the two commands come before any section"
    assert readme_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test_command
    assert all(c.startswith(("set ", "cd ")) for c in commands[:-1]), commands


def test_makefile_targets_set_themselves_up():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: \$\(STAMP\)", makefile, re.M), target
    # the CPU build from local disk, never a CUDA build pulled in by a loose requirement
    assert "TORCH ?= torch==2.13.0" in makefile
    constraints = (ROOT / "requirements" / "constraints-cpu.txt").read_text()
    assert not re.search(r"^(torchvision|open.clip|torch)==", constraints, re.M)


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_import_is_cheap():
    code = "import sys, img_guidance; print('torch' in sys.modules, img_guidance.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"


def test_readme_and_docs_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README and of docs/*.md runs as written (in a scratch folder),
    except those that say in their first line that they download the real models."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [(page, b) for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
    blocks = [(page, b) for page, b in blocks if not b.startswith("# Downloads")]
    assert {page.name for page, _ in blocks} >= {"README.md", "usage.md"}
    monkeypatch.chdir(tmp_path)
    for page, block in blocks:
        exec(compile(block, str(page.relative_to(ROOT)), "exec"), {"__name__": "readme"})


def test_links_between_the_readme_and_docs_resolve():
    """Every relative link of the README and docs/*.md names a file that exists, and a #fragment names
    a heading of it."""

    def anchors(page: Path) -> set[str]:
        headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
        return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (fragment and file.suffix == ".md" and fragment not in anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().encode()) < 14_000, "move detail into docs/"
