"""Fine-tuning MiniMax-M3's index branch by the KL loss (transformers, CPU-sized).

A small random MiniMax-M3 text model (one full-attention and two sparse layers, 8 / 2
heads of 64, index 2 x 64, blocks of 64, top-4; its QK-norm gains set to 3 so that the
main attention is peaked, as a trained model's is) with a frozen backbone; only the index
branch (projections and norms of each ``MiniMaxM3VLIndexer``) trains, on random token
sequences, through ``enable_msa(model, train_indexer=True)``: a dense warm-up for the
first half of the steps, then sparse. Every ``eval_every`` steps, on a held-out sequence,
per sparse layer: the dense indexer KL and the *recall*, the share of the layer's dense
attention probability (last ``probe`` queries, all heads) inside the blocks the index
branch selects, next to the best any selection of that size reaches.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import List

import torch

from ..config import MSAConfig
from ..functional import msa_indexer
from ..varlen import Segments
from .niah import best_mass, block_mass, mass_inside


@dataclass
class Point:
    step: int
    mode: str
    train_kl: float
    eval_kl: float
    recall: List[float]          # per sparse layer
    best: List[float]


def _model(seed: int = 0, index_precision: str = "input"):
    from transformers.models.minimax_m3_vl import (MiniMaxM3VLForCausalLM,
                                                   MiniMaxM3VLTextConfig)

    from ..integrations.transformers import enable_msa
    cfg = MiniMaxM3VLTextConfig(
        vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, dense_intermediate_size=128,
        shared_intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        index_n_heads=2, index_head_dim=64, index_block_size=64, index_topk_blocks=4,
        layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
        mlp_layer_types=["dense", "sparse", "sparse"], bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5})
    torch.manual_seed(seed)
    model = MiniMaxM3VLForCausalLM(cfg)
    with torch.no_grad():                      # peaked main attention (QK-norm gain 3x)
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(2.0)
            layer.self_attn.k_norm.weight.fill_(2.0)
    return enable_msa(model, train_indexer=True, mode="dense", index_precision=index_precision)


def _index_params(model):
    return [p for n, p in model.named_parameters() if ".indexer." in n]


def sparse_layer_inputs(model, ids: torch.Tensor) -> list:
    """Run ``model`` (msa switched on) on ``ids`` and return, per sparse layer, its
    ``(q [T, Hq, D], k [T, Hkv, D], IndexInputs)`` (batch row 0), in the caller's grad
    mode."""
    from ..integrations.transformers import attention as hf_attention
    from ..integrations.transformers import minimax_m3
    captured = []
    inner = minimax_m3.sparse_attention

    def capture(module, query, key, value, inputs, mask, scaling, position_ids):
        captured.append((query[0].transpose(0, 1), key[0].transpose(0, 1), inputs))
        return inner(module, query, key, value, inputs, mask, scaling, position_ids)
    hf_attention.sparse_attention = capture
    try:
        model(ids)
    finally:
        hf_attention.sparse_attention = inner
    return captured


def layer_config(model) -> MSAConfig:
    """The MSAConfig of a MiniMax-M3 model's sparse layers (default softmax scale)."""
    from ..integrations.transformers.minimax_m3 import msa_config, text_config
    c = text_config(model)
    return msa_config(c, c.head_dim ** -0.5)


def recall(model, ids: torch.Tensor, probe: int):
    """``(kl, [recall per sparse layer], [best per sparse layer])`` on one sequence."""
    from ..integrations.transformers import indexer_kl_loss
    with torch.enable_grad():                  # the KL is computed when the branch trains
        captured = sparse_layer_inputs(model, ids)
        kl = float(indexer_kl_loss(model))
    cfg = layer_config(model)
    T = ids.shape[1]
    seg = Segments([0], [probe], [0], [T], probe, T)
    recalls, bests = [], []
    with torch.no_grad():
        for q, k, inputs in captured:
            sel = msa_indexer(inputs.qi[0, T - probe:], inputs.ki[0],
                              torch.tensor([0, probe]), torch.tensor([0, T]),
                              block_size=cfg.block_size, topk=cfg.topk)
            mass = block_mass(q[T - probe:].detach(), k.detach(), seg, cfg)
            recalls.append(mass_inside(mass, sel.long()))
            bests.append(best_mass(mass, seg, cfg, cfg.index_heads))
    return kl, recalls, bests


def run(steps: int = 300, length: int = 1024, probe: int = 256, lr: float = 1e-2,
        eval_every: int = 20, seed: int = 0, progress: bool = True,
        index_precision: str = "input") -> List[Point]:
    """Train and evaluate; ``index_precision``: of the sparse steps' selection (the
    evaluation's recall always ranks in the inputs' precision)."""
    model = _model(seed, index_precision)
    model.train()
    params = _index_params(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    held_out = torch.randint(3, 512, (1, length), generator=g)
    points = []
    from ..integrations.transformers import indexer_kl_loss
    for step in range(steps + 1):
        mode = "dense" if step < steps // 2 else "sparse"
        model.config.msa_mode = mode
        if step % eval_every == 0:             # the dense KL: comparable across modes
            model.eval()
            model.config.msa_mode = "dense"
            kl, rec, best = recall(model, held_out, probe)
            model.config.msa_mode = mode
            model.train()
            train_kl = points[-1].train_kl if points else float("nan")
            points.append(Point(step, mode, train_kl, kl, rec, best))
            if progress:
                print(f"step {step:4d} {mode:6s} eval KL {kl:.4f} recall "
                      f"{' '.join(f'{r:.3f}' for r in rec)} (best "
                      f"{' '.join(f'{b:.3f}' for b in best)})", flush=True)
        if step == steps:
            break
        ids = torch.randint(3, 512, (1, length), generator=g)
        out = model(ids).logits
        out.sum().mul(0).backward()            # only the attached KL has gradient here
        opt.step()
        opt.zero_grad()
        if points:
            points[-1].train_kl = float(indexer_kl_loss(model))
    return points


def plot(points: List[Point], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [p.step for p in points]
    a.plot(steps, [p.eval_kl for p in points], marker="o")
    a.set_xlabel("step")
    a.set_ylabel("indexer KL (held-out, sum over sparse layers)")
    a.axvline(points[-1].step // 2, color="gray", ls="--", lw=1)
    for i in range(len(points[0].recall)):
        b.plot(steps, [p.recall[i] for p in points], marker="o", label=f"sparse layer {i + 1}")
        b.plot(steps, [p.best[i] for p in points], ls=":", color=f"C{i}")
    b.set_xlabel("step (dashed: dense warm-up ends)")
    b.set_ylabel("recall of dense attention mass")
    b.axvline(points[-1].step // 2, color="gray", ls="--", lw=1)
    b.legend(fontsize=8)
    fig.suptitle("MiniMax-M3 index branch trained by the KL (random model, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(steps: int, json_path=None, png_path=None, progress=True,
         index_precision: str = "input") -> List[Point]:
    if png_path:
        from .plots import require_matplotlib
        require_matplotlib()
    t0 = time.perf_counter()
    points = run(steps=steps, progress=progress, index_precision=index_precision)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(meta=dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                                     seconds=round(time.perf_counter() - t0, 1),
                                     steps=steps, index_precision=index_precision),
                           points=[asdict(p) for p in points]), f, indent=1)
    if png_path:
        plot(points, png_path)
    return points
