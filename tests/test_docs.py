"""The generated API reference is current; every citation of docs/methods.md points at something there."""
import importlib.util
import re
from pathlib import Path

from equimodal.cli import main
from equimodal.methods import available_methods

ROOT = Path(__file__).resolve().parents[1]
METHODS_MD = ROOT / "docs" / "methods.md"


def _anchors() -> set[str]:
    """GitHub's heading anchors of docs/methods.md."""
    heads = re.findall(r"^#+ (.+)$", METHODS_MD.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_api_reference_is_current():
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    assert (ROOT / "docs" / "api.md").read_text() == text, "docs/api.md is out of date: run python docs/build_api.py"
    for name in ("Method", "MultimodalModel", "ModelOutput", "build_method", "Trainer", "register_dataset",
                 "load_dataset", "register_model", "bench", "diagnose", "before_step"):
        assert f"{name}" in text


def test_methods_md_is_cited_by_its_path_and_existing_headings(capsys):
    anchors = _anchors()
    headings = {h.split(" (")[0] for h in re.findall(r"^### (.+)$", METHODS_MD.read_text(), re.M)}
    described = {n.strip() for h in headings for n in h.split(",")}
    missing = sorted(set(available_methods()) - described)
    assert not missing, f"registered methods without a heading in docs/methods.md: {missing}"
    sources = [*sorted((ROOT / "src").rglob("*.py")), ROOT / "README.md"]
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"(\S*)methods\.md(#[\w-]+)?", text):
            assert match.group(1).endswith("docs/") or match.group(1).endswith("(docs/"), \
                f"{path.name}: cite docs/methods.md by its path, not {match.group(0)!r}"
            if match.group(2):
                assert match.group(2)[1:] in anchors, f"{path.name}: no heading {match.group(2)} in docs/methods.md"
        for quoted in re.findall(r'docs/methods\.md, "([^"]+)"', text):
            assert quoted in headings, f"{path.name}: no heading {quoted!r} in docs/methods.md"
        assert "methods.md §" not in text
    assert main(["methods", "-v"]) == 0
    assert "docs/methods.md" in capsys.readouterr().out
