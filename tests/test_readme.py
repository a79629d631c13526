"""The README's plain-loop example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_plain_loop_example_runs(capsys):
    text = README.read_text()
    match = re.search(r"<!-- plain-loop-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its plain-loop example"
    namespace: dict = {}
    exec(compile(match.group(1), str(README), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and "k/visual" in printed[-1]
    method, model = namespace["method"], namespace["model"]
    assert method.step == 2 * 8  # 512 samples, batches of 64, two epochs


def test_quick_start_has_exactly_two_setup_commands():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert [b.strip() for b in blocks] == ["pip install -e . && equimodal train",
                                          'pip install -e ".[test]" && python -m pytest']
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && python -m pytest' in ci
