"""Test helpers: random selections, forced launch configurations, plans (oracles in
``brute.py``, stress selections in ``patterns.py``)."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_topk(seg, heads, k, block, seed=0, p_empty=0.2, future=True):
    """``[heads, total_q, k]`` int32 of unique random block ids (some -1, order random).

    With ``future=False`` ids are limited to blocks at or before the query's local block.
    """
    g = torch.Generator().manual_seed(seed)
    out = torch.full((heads, seg.total_q, k), -1, dtype=torch.int32)
    for b in range(seg.num_segments):
        nb = seg.num_blocks(b, block)
        for i in range(seg.q_len[b]):
            pos = seg.k_len[b] - seg.q_len[b] + i
            limit = nb if future else pos // block + 1
            for h in range(heads):
                n = min(k, limit)
                ids = torch.randperm(limit, generator=g)[:n]
                keep = torch.rand(n, generator=g) >= p_empty
                ids = torch.where(keep, ids, torch.full_like(ids, -1))
                slots = torch.randperm(k, generator=g)[:n]
                out[h, seg.q_start[b] + i, slots] = ids.to(torch.int32)
    return out


def shared_topk(seg, heads, k, block, seed):
    """Selections consecutive queries share (a sink, the query's own block and a few
    recent ones, one random block), as text gives them: unions far below ``QT * K``."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((heads, seg.total_q, k), -1, dtype=torch.int32)
    for b in range(seg.num_segments):
        for i in range(seg.q_len[b]):
            own = (seg.k_len[b] - seg.q_len[b] + i) // block
            ids = list(dict.fromkeys([0, own] + [max(0, own - j) for j in (1, 2)]))
            ids.append(int(torch.randint(0, own + 1, (1,), generator=g)))
            ids = list(dict.fromkeys(ids))[:k]
            for h in range(heads):
                out[h, seg.q_start[b] + i, torch.randperm(k, generator=g)[:len(ids)]] = \
                    torch.tensor(ids, dtype=torch.int32)
    return out


def kl_case(q_lens, k_lens, hq, hkv, frag=None, kk=3, block=64, dtype=torch.float32, seed=5,
            d=64, select=None):
    """An indexer-KL case with ``Hi == Hkv``: ``(run, ref)``, ``run(kernel, chunk=None,
    det=False)`` calling ``msa.ops.kl.triton.indexer_kl_bwd`` on a fresh plan and ``ref``
    the fp64 reference's ``(loss, dqi, dki)``. ``select(seg, heads, k, block, seed)``
    gives the selection (default: random, no block after its query)."""
    from msa.ops.attention.naive import attention_forward_reference
    from msa.ops.indexer.triton import selected_lse
    from msa.ops.kl.naive import indexer_kl_reference
    from msa.ops.kl.triton import indexer_kl_bwd
    from tests.helpers.brute import make_case
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=d, hi=hkv, di=d, fragment_indices=frag,
                  seed=seed, scale=0.7)
    seg = c["seg"]
    select = select or (lambda *a, seed: random_topk(*a, seed=seed, future=False))
    topk = select(seg, hkv, kk, block, seed=seed).to(DEVICE)
    q, k, v, qi, ki = (c[n].to(DEVICE, dtype) for n in ("q", "k", "v", "qi", "ki"))
    _, tlse = attention_forward_reference(q, k, v, topk, seg, block_size=block, scale=0.125)
    ilse = selected_lse(qi, ki, topk, plan_of(topk, seg, block, hkv), scale=0.125)
    ref = indexer_kl_reference(q.double(), k.double(), qi.double(), ki.double(), seg, topk,
                               block_size=block, scale=0.125, index_scale=0.125,
                               loss_coeff=0.3)
    run = lambda kernel, chunk=None, det=False: indexer_kl_bwd(  # noqa: E731
        q, k, tlse, qi, ki, ilse, topk, plan_of(topk, seg, block, hkv, chunk), scale=0.125,
        index_scale=0.125, loss_coeff=0.3, kernel=kernel, deterministic=det)
    return run, ref


def plan_of(topk, seg, block, heads, chunk=None, q_per_item=256):
    """A fresh ``SparsePlan`` of ``topk`` (chunks of ``chunk`` queries, default all)."""
    from msa.ops.plan import build_plan
    return build_plan(topk, seg, block_size=block, heads=heads,
                      chunk=chunk or max(1, seg.total_q), q_per_item=q_per_item)


def force_launch(monkeypatch, module, choose):
    """Make ``module``'s kernels launch with the one configuration ``choose(configs)``
    picks from their fallback list (``msa.ops.launch``). Returns the list of the
    configurations used, one per launch."""
    from msa.ops import launch
    used = []

    def forced(kernel, grid, args, configs, **fixed):
        used.append(choose(configs))
        return launch.launch_fitting(kernel, grid, args, used[-1:], **fixed)
    monkeypatch.setattr(module, "launch_fitting", forced)
    return used


def force_smallest_launch(monkeypatch, module):
    """Make ``module``'s kernels launch with their last (smallest) fallback configuration,
    the one a GPU with little shared memory runs."""
    return force_launch(monkeypatch, module, lambda configs: configs[-1])


def gluon_ptx(module: str, kernel: str, sig: dict, const):
    """PTX of Gluon ``module.kernel`` compiled for sm_90a (``compiled_ptx``) with argument
    types ``sig`` (name -> Triton type string) and constexprs ``const`` (``num_warps``
    included); pointers and ``stride*`` arguments are declared 16-divisible, as a
    launch on aligned tensors specializes them (cp.async needs it). ``const`` a list of
    such dicts (and ``sig`` one dict for all, or a list beside them): the list of their
    PTX, compiled in one process."""
    consts = const if isinstance(const, list) else [const]
    sigs = sig if isinstance(sig, list) else [sig] * len(consts)
    out = compiled_ptx(f"""
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from {module} import {kernel} as fn
for sig, const in zip({sigs!r}, {consts!r}):
    sig = {{**sig, **{{k: "constexpr" for k in const}}}}
    aligned = [n for n in sig if sig[n].startswith("*") or n.startswith("stride")]
    attrs = {{(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    print(triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={{"num_warps": const["num_warps"]}}).asm["ptx"])
    print("=== end of kernel ===")
""").split("=== end of kernel ===\n")[:-1]
    return out if isinstance(const, list) else out[0]


def compiled_ptx(program: str) -> str:
    """The stdout of ``program`` (Python that prints a kernel's PTX) run in a fresh process
    without ``TRITON_INTERPRET``: the suite runs Triton's interpreter, whose helpers cannot
    be compiled for a GPU target; the repository root goes on its path (the suite may run
    from ``tests/``). Fails the test with the process's stderr."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def nan_empty(module, monkeypatch, ints=None):
    """``module.torch.empty`` NaN-fills float buffers (and integer ones with ``ints``
    where given): a row read or returned unwritten poisons."""
    empty = torch.empty

    def filled(*a, **kw):
        x = empty(*a, **kw)
        if x.is_floating_point():
            return x.fill_(float("nan"))
        return x if ints is None or x.dtype == torch.bool else x.fill_(ints)
    monkeypatch.setattr(module.torch, "empty", filled)
