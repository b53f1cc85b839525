"""Decoding with the whole one-token step of a transformers model in one CUDA graph.

transformers runs a decode step as eager Python: each layer's projections, norms, RoPE,
cache writes, MoE and attention launch their kernels one after the other, about 1.7 ms of
launch latency per layer, where msa's fused decoder needs 30 us of GPU time for a sparse
layer at 128K tokens. With msa switched on and a static cache, a decode step neither
reads anything back to the host nor allocates after its first run (the cache lengths
live on the device, the sparse layers take the real length from ``position_ids`` on the
device, the full-attention layers mask the unwritten slots on the device), so the step
is captured once and replayed for every token.

``GraphedDecoder(model, max_cache_len, batch_size, kv_dtype=None, index_dtype=None)``
(``kv_dtype=torch.float8_e4m3fn``: the sparse layers' K/V in an FP8 cache,
``fp8_cache.py``; ``index_dtype`` the same for their index keys):

* ``prefill(input_ids [B, T], chunk_size=None) -> logits [B, V]`` fills the cache
  (optionally in chunks) and returns the last token's logits;
* ``step(tokens [B]) -> logits [B, V]`` appends one token per row (the graph replayed on
  CUDA; the same Python runs eagerly on the CPU);
* ``generate(input_ids, max_new_tokens, eos_token_id=None) -> [B, T + new]``: greedy.

Rows of a batch share their length (no padding: use ``model.generate`` for padded
batches). MoE layers run with ``experts_implementation="batched_mm"`` while captured:
the eager experts loop reads the routed experts back to the host.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from .compat import cache_kwarg
from .minimax_m3 import is_minimax_m3

SYNC_FREE_EXPERTS = "batched_mm"


class GraphedDecoder:
    """Greedy decoding with a static cache and a CUDA-graphed one-token step (see module
    docstring). ``max_cache_len`` is rounded up to a multiple of the model's block size
    (the fused decoder reads a static cache of more than one row as whole pages)."""

    def __init__(self, model, max_cache_len: int, batch_size: int = 1, kv_dtype=None,
                 index_dtype=None):
        from transformers import StaticCache

        from ...ops.quant import E4M3
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) \
                or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        cfg = model.config.get_text_config(decoder=True)
        if getattr(cfg, "_attn_implementation", None) != "msa":
            raise ValueError("GraphedDecoder needs a model with msa switched on: "
                             "model = enable_msa(model)")
        if not is_minimax_m3(model):
            raise ValueError("GraphedDecoder captures MiniMax-M3 models (their decode step "
                             "reads nothing on the host); use model.generate() for others")
        if kv_dtype not in (None, E4M3):
            raise ValueError(f"kv_dtype must be None (the model's dtype) or "
                             f"torch.float8_e4m3fn, got {kv_dtype}")
        if index_dtype is not None and kv_dtype is None:
            raise ValueError("index_dtype goes with kv_dtype=torch.float8_e4m3fn (an FP8 "
                             "cache)")
        block = getattr(cfg, "index_block_size", 128)
        self.model = model
        self.max_cache_len = -(-max_cache_len // block) * block
        self.batch_size = batch_size
        param = next(model.parameters())
        self.device = param.device
        if kv_dtype is None:
            self.cache = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        else:
            from .fp8_cache import fp8_static_cache
            self.cache = fp8_static_cache(model, self.max_cache_len, index_dtype)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.length = 0                       # tokens in the cache (host copy)
        self.graph = None
        self.logits = None
        self._cfg = cfg
        self._cache_kwarg = cache_kwarg(model)      # "cache" or "past_key_values"

    # -- the step -------------------------------------------------------------------

    def _forward(self, input_ids, position_ids) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: self.cache})
        return out.logits[:, -1]

    def _lengths(self) -> List[torch.Tensor]:
        """The cache's device-side length counters (a decode step advances them)."""
        counters = []
        for layer in self.cache.layers:
            for name in ("cumulative_length", "idx_cumulative_length"):
                value = getattr(layer, name, None)
                if isinstance(value, torch.Tensor):
                    counters.append(value)
        return counters

    def _capture(self) -> None:
        """Warm up (kernels compiled, buffers allocated) then capture one step; the warm
        up's cache writes are undone by restoring the length counters."""
        counters = self._lengths()
        saved = [c.clone() for c in counters]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(self.tokens, self.position)
                for c, s in zip(counters, saved):
                    c.copy_(s)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(self.tokens, self.position)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """``input_ids [B, T]`` into the empty cache -> last token's logits ``[B, V]``."""
        if self.length:
            raise ValueError("prefill fills an empty cache; make a new GraphedDecoder")
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must be [batch_size={self.batch_size}, T], got "
                             f"{tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if not 1 <= t < self.max_cache_len:
            raise ValueError(f"input_ids has {t} tokens; the cache holds "
                             f"{self.max_cache_len} (one more is needed to decode)")
        chunk = t if chunk_size is None else chunk_size
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        input_ids = input_ids.to(self.device)
        for start in range(0, t, chunk):
            end = min(t, start + chunk)
            pos = torch.arange(start, end, device=self.device).expand(self.batch_size, -1)
            logits = self._forward(input_ids[:, start:end], pos)
        self.length = t
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens [B]`` (one per row) -> their logits ``[B, V]``."""
        if not self.length:
            raise ValueError("call prefill(input_ids) before step()")
        if self.length >= self.max_cache_len:
            raise ValueError(f"the cache is full ({self.max_cache_len} tokens)")
        self.tokens.copy_(tokens.view(self.batch_size, 1))
        self.position.fill_(self.length)
        if self.device.type != "cuda":
            logits = self._forward(self.tokens, self.position)
        else:
            if self.graph is None:
                with _sync_free_experts(self._cfg):
                    self._capture()
            self.graph.replay()
            logits = self.logits.clone()
        self.length += 1
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: Optional[int] = None,
                 chunk_size: Optional[int] = None) -> torch.Tensor:
        """Greedy: ``input_ids [B, T]`` -> ``[B, T + n]``, ``n <= max_new_tokens`` (stops
        when every row has produced ``eos_token_id``)."""
        logits = self.prefill(input_ids, chunk_size)
        out = [input_ids.to(self.device)]
        done = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            tok = logits.argmax(-1)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            out.append(tok.view(-1, 1))
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self.step(tok)
        return torch.cat(out, dim=1)


@contextlib.contextmanager
def _sync_free_experts(cfg):
    """MoE configs use the sync-free experts implementation inside the block."""
    current = getattr(cfg, "_experts_implementation", None)
    if current in (None, SYNC_FREE_EXPERTS):
        yield
        return
    cfg._experts_implementation = SYNC_FREE_EXPERTS
    try:
        yield
    finally:
        cfg._experts_implementation = current
