"""Train a small MSA transformer on a long-context retrieval task, next to a dense twin.

    python benchmarks/train_retrieval.py --out train.json        # GPU, a few minutes

Task (copying): a sequence of ``T`` tokens whose first half is random and whose second
half is made of spans of ``SPAN`` tokens copied from random places of the first half. The
loss counts the second half only; a model predicts a copied token by finding where its
span came from (induction over up to ``T`` tokens). Models: ``LAYERS`` x (RMSNorm,
``msa.nn.MSAttention``, RMSNorm, SwiGLU MLP), width 128, Hq=4, Hkv=2, D=64, 2 index heads
of 64, block 64, top-8 (512 of ``T`` keys).

Schedule (both models): ``--warmup`` steps at ``--warmup-length`` tokens (short: the
induction circuit forms there; at 128 tokens it appears after ~750 steps, loss 7.2 ->
0.2, accuracy 0.97 by step 900), then the length doubles every ``--grow-steps`` steps up
to ``--length`` at learning rate ``--lr-after``.

* dense: attention dense for all steps (no indexer training);
* msa: dense during the warm-up (indexer trained by the dense KL), then sparse MSA
  (indexer trained by the sparse KL).

Logged: training loss of both, the KL, and at the end, per layer, the attention recall
(share of dense attention mass inside the blocks the indexer selects, last 256 queries)
and copy accuracy at the training length and at 2x / 4x of it.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

import msa
from msa.eval.niah import best_mass, block_mass, mass_inside
from msa.nn import MSAttention
from msa.nn.rope import rope_cos_sin
from msa.varlen import Segments

VOCAB, WIDTH, LAYERS, SPAN = 2048, 128, 2, 16
CFG = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, num_index_heads=2,
                    index_head_dim=64, block_size=64, topk=8, kl_loss_coeff=1.0)


class Block(nn.Module):
    def __init__(self, i, cfg):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(WIDTH), nn.RMSNorm(WIDTH)
        self.attn = MSAttention(WIDTH, cfg, layer_idx=i)
        self.up = nn.Linear(WIDTH, 2 * 4 * WIDTH, bias=False)
        self.down = nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x, mode):
        y, aux = self.attn(self.n1(x), mode=mode, return_aux=True)
        self.kl = aux.kl_loss                       # detached indexer KL of this step
        x = x + y
        a, b = self.up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(a) * b)


class Model(nn.Module):
    def __init__(self, cfg=CFG):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block(i, cfg) for i in range(LAYERS))
        self.norm = nn.RMSNorm(WIDTH)
        nn.init.normal_(self.emb.weight, std=0.02)              # tied output embedding

    def forward(self, ids, mode):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, mode)
        return self.norm(x) @ self.emb.weight.t()


def batch(n, T, g, device):
    """``ids [n, T]`` and the mask of predictable targets (copied tokens after a span's
    first one)."""
    half = T // 2
    ids = torch.randint(VOCAB, (n, T), generator=g, device=device)
    starts = torch.randint(half - SPAN, (n, half // SPAN), generator=g, device=device)
    src = (starts.unsqueeze(-1) + torch.arange(SPAN, device=device)).view(n, -1)
    ids[:, half:half + src.shape[1]] = torch.gather(ids, 1, src)
    target = torch.zeros(n, T, dtype=torch.bool, device=device)
    target[:, half:] = (torch.arange(half, device=device) % SPAN != 0)
    return ids, target


def loss_and_acc(model, ids, target, mode):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
        logits = model(ids[:, :-1], mode)
    t = target[:, 1:]
    y = ids[:, 1:]
    loss = F.cross_entropy(logits[t].float(), y[t])
    acc = (logits[t].argmax(-1) == y[t]).float().mean()
    return loss, acc


@torch.no_grad()
def recall(model, ids, probe=256):
    """Per layer: dense attention mass (last ``probe`` queries, every head) inside the
    indexer's selected blocks, with the trained index projections; and the most any
    selection of as many blocks (local block included) could hold (``oracle_mass``)."""
    res, best, x = [], [], model.emb(ids[:1])
    T = ids.shape[1]
    for blk in model.blocks:
        a, h = blk.attn, blk.n1(x).float()
        c = CFG
        q = a.q_norm(a.q_proj(h).view(1, T, c.num_heads, c.head_dim))
        k = a.k_norm(a.k_proj(h).view(1, T, c.num_kv_heads, c.head_dim))
        qi = a.index_q_norm(a.index_q_proj(h).view(1, T, c.index_heads, c.index_dim))
        ki = a.index_k_norm(a.index_k_proj(h).view(1, T, 1, c.index_dim))
        cos, sin = rope_cos_sin(torch.arange(T, device=ids.device), a.rotary_dim, a.rope_theta)
        q, k, qi, ki = (a._rope(t, cos.unsqueeze(0), sin.unsqueeze(0)) for t in (q, k, qi, ki))
        cu_q = torch.tensor([0, probe], dtype=torch.int32, device=ids.device)
        cu_k = torch.tensor([0, T], dtype=torch.int32, device=ids.device)
        sel = msa.msa_indexer(qi[0, -probe:], ki[0], cu_q, cu_k, block_size=c.block_size,
                              topk=c.topk)
        seg = Segments([0], [probe], [0], [T], probe, T)
        mass = block_mass(q[0, -probe:], k[0], seg, c)
        res.append(mass_inside(mass, sel.long()))
        best.append(best_mass(mass, seg, c, num_groups=sel.shape[0]))
        x = blk(x, "sparse")
    return res, best


def train(mode_of_step, steps, length_of_step, bsz, seed, device, log_every=25,
          max_seconds=1e9, cfg=CFG, lr=3e-3, lr_factor=lambda s: 1.0):
    torch.manual_seed(seed)
    model = Model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    main_params = [p for n, p in model.named_parameters() if ".index_" not in n]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * lr_factor(s))
    g = torch.Generator(device=device).manual_seed(seed + 1)
    log = []
    t0 = time.perf_counter()
    for step in range(steps):
        mode, T = mode_of_step(step), length_of_step(step)
        ids, target = batch(bsz, T, g, device)
        loss, acc = loss_and_acc(model, ids, target, mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # clip the main branch alone: the indexer's KL gradient must not change the
        # main model's effective step (else the MSA model learns slower than its twin)
        torch.nn.utils.clip_grad_norm_(main_params, 1.0)
        opt.step()
        sched.step()
        last = step == steps - 1 or time.perf_counter() - t0 > max_seconds
        if step % log_every == 0 or last:
            kl = [None if b.kl is None else b.kl.item() for b in model.blocks]
            log.append(dict(step=step, mode=mode, T=T, loss=loss.item(), acc=acc.item(),
                            kl=kl, seconds=time.perf_counter() - t0))
            print(json.dumps(log[-1]), flush=True)
        if last:
            break
    return model, log


@torch.no_grad()
def evaluate(model, T, seed, device, mode):
    g = torch.Generator(device=device).manual_seed(seed)
    ids, target = batch(2, T, g, device)
    loss, acc = loss_and_acc(model, ids, target, mode)
    return dict(T=T, mode=mode, loss=loss.item(), acc=acc.item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--warmup", type=int, default=1200, help="dense warm-up steps")
    ap.add_argument("--warmup-length", type=int, default=128,
                    help="sequence length during the warm-up (both models)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-after", type=float, default=1e-3, help="learning rate after the "
                    "warm-up")
    ap.add_argument("--grow-steps", type=int, default=150, help="steps per length after the "
                    "warm-up (the length doubles up to --length)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-seconds", type=float, default=1e9, help="per model (safety)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--models", default="dense,msa", help="which of dense,msa to train")
    args = ap.parse_args()
    dev = torch.device(args.device)
    T = args.length
    runs = {}
    def length_of_step(s):
        """``--warmup-length`` during the warm-up, then doubling every ``--grow-steps``
        steps up to ``--length`` (a jump straight to 32x the length destroys the
        induction circuit: loss spike, then chance)."""
        if s < args.warmup:
            return args.warmup_length
        return min(T, args.warmup_length * 2 ** (1 + (s - args.warmup) // args.grow_steps))

    no_kl = replace(CFG, kl_loss_coeff=0.0)          # the dense twin trains no indexer
    for name, mode_of_step, cfg in (
            ("dense", lambda s: "dense", no_kl),
            ("msa", lambda s: "dense" if s < args.warmup else "sparse", CFG)):
        if name not in args.models.split(","):
            continue
        model, log = train(mode_of_step, args.steps, length_of_step, args.batch, 0, dev,
                           max_seconds=args.max_seconds, cfg=cfg, lr=args.lr,
                           lr_factor=lambda s: 1.0 if s < args.warmup else
                           args.lr_after / args.lr)
        final = "dense" if name == "dense" else "sparse"
        runs[name] = dict(log=log, eval=[evaluate(model, n * T, 7, dev, final)
                                         for n in (1, 2, 4)])
        if name == "msa":
            g = torch.Generator(device=dev).manual_seed(11)
            runs[name]["recall"], runs[name]["oracle_recall"] = recall(
                model, batch(1, T, g, dev)[0])
            runs[name]["eval_dense_attention"] = [evaluate(model, n * T, 7, dev, "dense")
                                                  for n in (1, 2, 4)]
        print(json.dumps({k: v for k, v in runs[name].items() if k != "log"}), flush=True)
    meta = dict(gpu=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), commit=args.commit, length=T,
                steps=args.steps, warmup=args.warmup, warmup_length=args.warmup_length,
                batch=args.batch, lr=args.lr, lr_after=args.lr_after,
                grow_steps=args.grow_steps,
                max_seconds=args.max_seconds,
                model=dict(vocab=VOCAB, width=WIDTH, layers=LAYERS, span=SPAN,
                           config=str(CFG)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
