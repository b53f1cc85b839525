"""Run vLLM's MiniMax-M3 Triton ops without vLLM: take the two op files out of a vLLM
wheel and give them a stand-in for the three things they import.

    pip download vllm==0.33.0 --no-deps -d wheels
    python -m msa.bench.vllm_ops wheels/vllm-0.33.0-*.whl .vllm_ops
    python -m msa bench prefill --vllm-ops .vllm_ops

The folder then holds ``sparse_attn.py``, ``index_topk.py`` (vLLM's code, not ours:
keep it out of version control) and a ``vllm`` package with ``platforms.current_platform``
(``is_cuda``, ``is_rocm``, ``is_device_capability``, ``is_arch_support_pdl``),
``triton_utils`` (``triton``, ``tl``) and ``utils.math_utils.round_up``.
"""
from __future__ import annotations

import os
import sys
import zipfile

OPS = ("sparse_attn.py", "index_topk.py")
PREFIX = "vllm/models/minimax_m3/common/ops/"

STAND_IN = {
    "vllm/__init__.py": "",
    "vllm/platforms.py": '''import torch


class _Platform:
    def is_cuda(self):
        return torch.cuda.is_available() and torch.version.hip is None

    def is_rocm(self):
        return torch.version.hip is not None

    def is_device_capability(self, capability):
        return torch.cuda.get_device_capability() == tuple(capability)

    def is_arch_support_pdl(self):
        return self.is_cuda() and torch.cuda.get_device_capability()[0] >= 9


current_platform = _Platform()
''',
    "vllm/triton_utils.py": "import triton\nimport triton.language as tl\n",
    "vllm/utils/__init__.py": "",
    "vllm/utils/math_utils.py": '''def round_up(x, y):
    return (x + y - 1) // y * y
''',
}


def prepare(wheel: str, out_dir: str) -> None:
    """Write the two op files of ``wheel`` and the stand-in package into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in OPS:
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(z.read(PREFIX + name))
    for path, text in STAND_IN.items():
        full = os.path.join(out_dir, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m msa.bench.vllm_ops VLLM_WHEEL OUT_DIR")
    prepare(sys.argv[1], sys.argv[2])
