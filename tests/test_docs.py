"""The documentation a newcomer reads from a clone: the README stays short, its links and the
data paths that README, docs, configs and the model card name exist in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]
NAMING_DATA = [*DOCS, *sorted((ROOT / "configs").glob("*.yaml")), *sorted((ROOT / "twotower" / "checkpoints").rglob("*.md"))]


def test_readme_is_user_documentation_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_relative_links_in_the_docs_exist():
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_the_training_data_they_name_ships_in_the_repository():
    for page in NAMING_DATA:
        text = page.read_text()
        assert "shared/data" not in text, page
        for path in re.findall(r"\bdata/[\w.-]+\.jsonl\b", text):
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} names missing {path}"
