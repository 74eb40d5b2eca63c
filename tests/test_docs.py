"""The README's links stay inside the repository, and the architecture page it links has the
sections a newcomer looks for."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_links_point_at_files_of_the_repository():
    links = re.findall(r"\]\(([^)#\s]+)\)", (REPO / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert "docs/architecture.md" in local
    for link in local:
        target = (REPO / link).resolve()
        assert target.is_relative_to(REPO) and target.exists(), link


def test_architecture_page_covers_layers_batch_path_and_extension_points():
    headings = re.findall(r"^#+ (.+)$", (REPO / "docs" / "architecture.md").read_text(), re.MULTILINE)
    for heading in ("The layers", "The path of a batch, from config to checkpoint", "A model", "A data format",
                    "A parallel method", "Sequence-parallel methods"):
        assert heading in headings, heading
