"""Every snippet in README.md and docs/*.md runs as written: python blocks execute in a
fresh interpreter (those starting with ``# gpu`` only where CUDA is), and each
``python -m msa ...`` command line of a bash block parses.

Without CUDA the interpreter of each snippet is a fork of one that has imported torch and
transformers already (``tests/snippet_runner.py``: the same globals as ``python -c``,
3-5 s less per snippet); with CUDA each runs in ``python -c``, so that no snippet's CUDA
state depends on what a parent process did before the fork.
"""
import os
import pathlib
import re
import select
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


TIMEOUT = 600


@pytest.fixture(scope="module")
def runner():
    """The pre-importing snippet runner (``None`` with CUDA or without ``os.fork``)."""
    if torch.cuda.is_available() or not hasattr(os, "fork"):
        yield None
        return
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "snippet_runner.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def _run(code, runner, tmp_path):
    """``(exit status, output)`` of the snippet ``code``."""
    if runner is None:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=TIMEOUT, cwd=ROOT)
        return res.returncode, res.stderr
    src, out = tmp_path / "snippet.py", tmp_path / "output.txt"
    src.write_text(code)
    runner.stdin.write(f"{src}\t{out}\n")
    runner.stdin.flush()
    if not select.select([runner.stdout], [], [], TIMEOUT)[0]:
        runner.kill()
        pytest.fail(f"the snippet ran past {TIMEOUT} s")
    status = runner.stdout.readline()
    assert status, "the snippet runner exited"
    return int(status), out.read_text()


@pytest.mark.parametrize("code", list(_blocks("python")))
def test_python_snippet_runs(code, runner, tmp_path):
    if code.startswith("# gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    status, output = _run(code, runner, tmp_path)
    assert status == 0, output[-3000:]


def test_runner_reports_what_python_c_would(runner, tmp_path):
    """A snippet that needs an import it lacks fails, though the runner imported it; an
    exception or ``sys.exit(3)`` give their status; output comes back."""
    if runner is None:
        pytest.skip("snippets run in python -c here")
    assert _run("x = torch.zeros(1)", runner, tmp_path)[0] == 1
    status, output = _run("raise ValueError('from the snippet')", runner, tmp_path)
    assert status == 1 and "ValueError: from the snippet" in output
    assert _run("import sys\nsys.exit(3)", runner, tmp_path)[0] == 3
    assert _run("import sys\nprint(__name__, sys.argv)", runner, tmp_path) == \
        (0, "__main__ ['-c']\n")


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
