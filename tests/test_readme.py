"""The README's API snippet runs as written (in a fresh interpreter, as a user would run it)."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_snippet_runs():
    readme = (ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "MoEFeedForward" in b)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(8, 32, 64) float32[8@(data,expert),32,64]" in proc.stdout
    assert "'dropped_fraction'" in proc.stdout and "'expert_load'" in proc.stdout
