"""The vLLM general plugin: swap msa's MiniMax-M3 ops into vLLM (opt-in).

vLLM calls ``register()`` in every engine and worker process (entry point
``vllm.general_plugins: msa``). It does nothing unless ``MSA_VLLM=1`` is set. Then it
imports vLLM's MiniMax-M3 attention backend and indexer modules, checks that vLLM's op
functions have the signatures the drop-ins implement (vLLM 0.33), and replaces the names
those modules call:

* ``vllm.models.minimax_m3.common.sparse_attention``: ``minimax_m3_sparse_attn``,
  ``minimax_m3_sparse_attn_decode``;
* ``vllm.models.minimax_m3.common.indexer``: ``minimax_m3_index_score``,
  ``minimax_m3_index_topk``, ``minimax_m3_index_decode``.

vLLM's originals stay reachable (``msa.integrations.vllm.ops.ORIGINALS``): the drop-ins
hand them what msa does not implement. A vLLM whose functions differ is left untouched,
with a warning that says why.
"""
from __future__ import annotations

import inspect
import logging
import os
import warnings
from typing import Dict, List

from . import ops

ENV = "MSA_VLLM"
MODULES = {
    "vllm.models.minimax_m3.common.sparse_attention": ("minimax_m3_sparse_attn",
                                                       "minimax_m3_sparse_attn_decode"),
    "vllm.models.minimax_m3.common.indexer": ("minimax_m3_index_score",
                                              "minimax_m3_index_topk",
                                              "minimax_m3_index_decode"),
}

logger = logging.getLogger("msa.vllm")


def _params(fn) -> List[str]:
    return list(inspect.signature(fn).parameters)


def _problems(modules: Dict[str, object]) -> List[str]:
    """Why vLLM's functions cannot be replaced (empty when they can)."""
    out = []
    for name, mod in modules.items():
        for fn in MODULES[name]:
            theirs = getattr(mod, fn, None)
            if theirs is None:
                out.append(f"{name} has no {fn}")
            elif theirs is not ops.OPS[fn] and _params(theirs) != _params(ops.OPS[fn]):
                out.append(f"{name}.{fn}{inspect.signature(theirs)} differs from the "
                           f"vLLM 0.33 signature msa implements")
    return out


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def install() -> bool:
    """Replace vLLM's MiniMax-M3 op names with msa's; returns whether it did."""
    import importlib
    modules = {name: importlib.import_module(name) for name in MODULES}
    problems = _problems(modules)
    if problems:
        msg = "msa: vLLM's MiniMax-M3 ops left as they are: " + "; ".join(problems)
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return False
    for name, mod in modules.items():
        for fn in MODULES[name]:
            theirs = getattr(mod, fn)
            if theirs is not ops.OPS[fn]:
                ops.ORIGINALS[fn] = theirs
                setattr(mod, fn, ops.OPS[fn])
    logger.info("msa: MiniMax-M3 prefill and decode ops now run on msa's kernels (%s)",
                ", ".join(sorted(ops.OPS)))
    return True


def register() -> None:
    """vLLM's plugin hook: ``install()`` when ``MSA_VLLM=1``."""
    if enabled():
        install()
