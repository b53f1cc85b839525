"""Runs doc snippets as ``python -c`` would, without paying the imports for each one.

Started once (by ``tests/test_docs.py`` on machines without CUDA), it imports the heavy
libraries the snippets use (torch and its compiler stack, transformers' model code) and
then, for each line ``<snippet file>\\t<output file>`` on stdin, forks a child that runs
the snippet as ``__main__`` in fresh globals (a snippet still needs its own imports) with
stdout and stderr in the output file, and answers its exit status on a line of stdout.
"""
import os
import sys
import traceback

import torch                    # noqa: F401  (imported once, shared by every child)
import torch._dynamo            # noqa: F401  (custom ops import it at their first call)
import transformers.modeling_utils  # noqa: F401


def _child(src: str, out: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdin = open(os.devnull)
    sys.argv = ["-c"]
    sys.path[0] = ""            # as with python -c: the working directory first
    try:
        with open(src) as f:
            code = compile(f.read(), "<string>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    sys.exit(0)


def main() -> None:
    for line in sys.stdin:
        src, out = line.rstrip("\n").split("\t")
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(src, out)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
