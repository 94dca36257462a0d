"""README.md opens with the two commands a new user copies, and CI runs the second verbatim."""

import os
import re

from tests.helpers import REPO


def _read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def test_readme_opens_with_demo_and_test_commands():
    readme = _read("README.md")
    head = readme.split("---")[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", head, re.S)
    assert len(blocks) == 2, blocks
    demo, tests = (b.strip() for b in blocks)
    assert demo.startswith("pip install") and "python -m lqae_vlap.main" in demo
    assert "configs/lqae_demo.py" in demo
    assert tests.startswith("pip install") and "pytest tests" in tests
    ci = [l.strip() for l in _read(".ci/run").splitlines() if l.strip() and not l.startswith("#")]
    assert tests in ci, (tests, ci)
