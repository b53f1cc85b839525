"""Every snippet in README.md and docs/*.md runs as written: python blocks execute in a
fresh interpreter (those starting with ``# gpu`` only where CUDA is), and each
``python -m msa ...`` command line of a bash block parses."""
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

from msa.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _blocks(lang):
    for path in FILES:
        for i, code in enumerate(re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(code, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(_blocks("python")))
def test_python_snippet_runs(code):
    if code.startswith("# gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]


def _commands():
    for path in FILES:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    part = part.split("#")[0].strip()
                    if part.startswith("python -m msa "):
                        yield pytest.param(part, id=f"{path.name}:{part[:40]}")


@pytest.mark.parametrize("command", list(_commands()))
def test_cli_command_parses(command):
    build_parser().parse_args(shlex.split(command)[3:])
