"""The pieces of .ci/run that can be checked without running CI: reading README.md's Quick start commands."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "readme_blocks.py"


def _module():
    spec = importlib.util.spec_from_file_location("readme_blocks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE = """# title

## Quick start (fresh machine)

Words.

```bash
pip install a && run --flag 'x y'
```

```python
not_a_command()
```

```bash
python -m pytest -q
```

### a subsection still belongs to it

```sh
third
```

## Next section

```bash
not in the section
```
"""


def test_blocks_of_the_section_in_order():
    blocks = _module().bash_blocks(SAMPLE, "Quick start")
    assert blocks == ["pip install a && run --flag 'x y'\n", "python -m pytest -q\n", "third\n"]


def test_missing_section_or_unclosed_fence_is_an_error():
    module = _module()
    with pytest.raises(LookupError, match="found 0"):
        module.bash_blocks(SAMPLE, "Install")
    with pytest.raises(LookupError, match="unclosed"):
        module.bash_blocks("## Quick start\n```bash\nrun\n", "Quick start")


def test_readme_quick_start_gives_ci_its_two_commands():
    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), str(ROOT / "README.md"), "Quick start", *args],
                              capture_output=True, text=True)

    assert int(run("count").stdout) >= 2
    setup, tests = run("1").stdout, run("2").stdout
    assert "pip install torch==2.13.0" in setup and "onelayer-fast sweep" in setup
    assert tests.strip() == "python -m pytest -q"
    missing = run("99")
    assert missing.returncode == 2 and "no block '99'" in missing.stderr
