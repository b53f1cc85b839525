"""What every benchmark case shares: timing, memory, the run's metadata, shapes, dense
and peer baselines, output files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch

from ..lengths import parse_lengths
from ..config import MSAConfig
from . import SHAPES
from .timeline import describe


def shape_config(name: str) -> MSAConfig:
    if name not in SHAPES:
        raise SystemExit(f"--shape: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    hq, hkv = SHAPES[name]
    return MSAConfig(num_heads=hq, num_kv_heads=hkv, head_dim=128, num_index_heads=hkv,
                     index_head_dim=128, block_size=128, topk=16)


def lengths(args, default: str, quick: str) -> List[int]:
    return args.lengths or parse_lengths(quick if args.quick else default)


def over_shapes(args, results: dict, check: Callable, run_length: Callable, default: str,
                quick: str) -> None:
    """For each ``--shape``: ``check(cfg)``, then (when it passed) ``run_length(T, cfg,
    name)`` per length; rows printed and stored in ``results["shapes"][name]``, and the
    results so far written to their JSON file after each (a run stopped part-way keeps
    the rows it finished)."""
    for name in args.shape.split(","):
        cfg = shape_config(name)
        ok = check(cfg)
        print(f"[{name}] check at 4K: {ok}")
        rows = []
        results["shapes"][name] = dict(config=cfg.__dict__, check=ok, rows=rows)
        dump(results, args)
        if ok["passed"]:
            for T in lengths(args, default, quick):
                r = run_length(T, cfg, name)
                print(f"[{name}] T={T}: " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.items() if not isinstance(v, dict)), flush=True)
                for k, v in r.items():
                    if isinstance(v, dict) and "kernels_ms" in v:     # a GPU timeline
                        print(f"[{name}] T={T} {k}: {describe(v)}", flush=True)
                rows.append(r)
                dump(results, args)
                torch.cuda.empty_cache()


def timed(fn: Callable, reps: int = 20, warmup: int = 3,
          before: Optional[Callable] = None) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event-timed calls (after
    ``warmup`` calls; fewer repetitions when one call takes over a second); ``before()``,
    where given, queued before each timed call, outside its time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if sum(times) > 10_000 and i >= 2:
            break
    times.sort()
    return times[len(times) // 2]


def timed_behind_work(fn: Callable, reps: int = 20, warmup: int = 3,
                      work_ms: float = 20.0) -> float:
    """Median milliseconds of ``fn()``'s GPU work with the host ahead: each call is queued
    behind about ``work_ms`` of bf16 matrix products (work, not a sleep kernel, so that
    the GPU's clocks and power stay as under back-to-back calls) and timed from that
    work's end to ``fn``'s last work. Up to ``fn``'s first host synchronisation the
    host's time is hidden, so ``timed(fn)`` minus this is the time the host paced the GPU
    there (the checks and launches before and between its first kernels); after such a
    synchronisation the two are alike."""
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    n = max(1, round(work_ms / timed(lambda: torch.mm(x, x, out=y), reps=5)))

    def work():
        for _ in range(n):
            torch.mm(x, x, out=y)
    return timed(fn, reps, warmup, before=work)


def peak_bytes(fn: Callable) -> int:
    """Peak CUDA memory allocated above the level before ``fn()``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def metadata(case: str) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:                       # noqa: BLE001 - record, never fail
            return None
    try:
        here = os.path.dirname(__file__)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here).stdout.strip()
        commit = commit + ("-dirty" if dirty else "") if commit else None
    except OSError:
        commit = None
    return dict(case=case, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=version("triton"), transformers=version("transformers"),
                fla_core=version("fla"),
                cuda=torch.version.cuda, python=platform.python_version(), commit=commit,
                date=datetime.date.today().isoformat(),
                command="python -m msa " + " ".join(sys.argv[1:]))


def dump(results: dict, args) -> str:
    """Write ``results`` to ``--json`` (default ``bench_<case>_<gpu>_<date>.json``)."""
    meta = results["meta"]
    gpu = meta["gpu"].lower().replace("nvidia ", "").split()[0]
    path = args.json or f"bench_{meta['case']}_{gpu}_{meta['date']}.json"
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return path


def write(results: dict, args) -> str:
    """``dump`` the finished results (and plot them with ``--png``)."""
    path = dump(results, args)
    print(f"wrote {path}")
    if getattr(args, "png", None):
        from .plots import plot
        plot(results, args.png)
        print(f"wrote {args.png}")
    return path


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rows_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of top-k rows (last dim) holding the same set of ids."""
    return (torch.sort(a, -1).values == torch.sort(b, -1).values).all(-1).float().mean().item()


def cosine(a: torch.Tensor, b: torch.Tensor, rows: int = 1 << 16) -> float:
    """Cosine similarity of ``a`` and ``b`` as flat vectors, summed in fp64 over chunks of
    ``rows`` leading-dim rows (no fp32 copy of the whole tensors: 32 GiB each for a 1M
    token attention output)."""
    dot = na = nb = 0.0
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows].double(), b[i:i + rows].double()
        dot += (x * y).sum().item()
        na += (x * x).sum().item()
        nb += (y * y).sum().item()
    return dot / max((na * nb) ** 0.5, 1e-300)


def dense_causal(q, k, v, backend: str) -> torch.Tensor:
    """Dense causal attention by SDPA's ``backend`` ("cudnn" / "flash"): ``q [1, Hq, T,
    D]``, ``k, v [1, Hkv, T, D]`` (GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel(kind):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True)


def best_dense(fn_of_backend: Callable[[str], Callable], reps: int = 10) -> Dict[str, float]:
    """Time a dense baseline with each SDPA backend; ``{"cudnn": ms, "flash": ms,
    "best": ms, "best_backend": name}`` (a backend that fails is recorded as None)."""
    out: Dict[str, Optional[float]] = {}
    for name in ("cudnn", "flash"):
        try:
            out[name] = timed(fn_of_backend(name), reps=reps, warmup=1)
        except RuntimeError as e:              # not available for this shape / GPU
            out[name] = None
            print(f"  dense {name}: {str(e).splitlines()[0][:100]}")
    ok = {k: v for k, v in out.items() if v is not None}
    out["best_backend"] = min(ok, key=ok.get) if ok else None
    out["best"] = ok[out["best_backend"]] if ok else None
    return out


def load_fla():
    """fla's ``parallel_nsa`` or None when fla-core is not installed."""
    try:
        from fla.ops.nsa.parallel import parallel_nsa
        return parallel_nsa
    except Exception as e:                     # noqa: BLE001 - a missing peer is recorded
        print("fla unavailable:", repr(e)[:160])
        return None


def load_vllm(folder: Optional[str]):
    """vLLM's MiniMax-M3 Triton op modules ``(sparse_attn, index_topk)`` from ``folder``
    (the two op files beside a stand-in ``vllm`` package), or None."""
    if not folder:
        return None
    sys.path.insert(0, folder)
    try:
        import index_topk
        import sparse_attn
        return sparse_attn, index_topk
    except Exception as e:                     # noqa: BLE001
        print("vllm ops unavailable:", repr(e)[:160])
        return None


def wants(args, name: str) -> bool:
    return args.baselines == "all" or name in args.baselines.split(",")
