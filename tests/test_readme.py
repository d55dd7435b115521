"""The README's ```python examples run as written (keeps the README true). Blocks fenced as
```py are illustrations that need the real model (covered by the slow tests)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "best-of-16 KL bound: 1.835 nats" in out


def test_cli_version_and_env(capsys):
    from tether import __version__
    from tether.cli import main

    assert main(["env"]) == 0
    assert f"tether: {__version__}" in capsys.readouterr().out
