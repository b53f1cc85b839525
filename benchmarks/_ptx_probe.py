import torch, msa
from bench_prefill import selection, planted_topics, BS, D, HQ, HKV
from msa.ops.attention.forward import sparse_attn_fwd
from msa.ops.indexer.triton import selected_lse
from msa.ops.kl.triton import indexer_kl_bwd
from msa.varlen import Segments
T = 16384; dev = 'cuda'
q = torch.randn(T, HQ, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(T, HKV, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
seg = Segments([0], [T], [0], [T], T, T); topk = selection(T, 'random', dev)
out, lse = sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5)
qi, ki = planted_topics(T, dev)
cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
msa.msa_indexer(qi, ki, cu, cu, block_size=BS, topk=16)
ilse = selected_lse(qi, ki, topk, seg, block_size=BS, scale=D ** -0.5)
indexer_kl_bwd(q, k, lse, qi, ki, ilse, topk, seg, block_size=BS, scale=D ** -0.5, index_scale=D ** -0.5)
torch.cuda.synchronize()
