"""MSAttention layer: training signal to both branches, dense equivalence, cached decoding."""
import pytest
import torch

import msa
from msa.nn import KVCache, MSAttention

CFG = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3,
                    kl_loss_coeff=0.5)


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    return MSAttention(96, CFG, **kw).double()


def test_training_gives_gradients_to_main_and_index_projections():
    layer = _layer(rotary_dim=32, qk_norm=True).train()
    x = torch.randn(2, 300, 96, dtype=torch.float64)
    y, aux = layer(x, return_aux=True)
    assert y.shape == x.shape and aux.kl_loss is not None and aux.kl_loss > 0
    y.pow(2).mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_index_gradient_is_the_kl_gradient_whatever_the_output_gradient():
    layer = _layer().train()
    x = torch.randn(1, 200, 96, dtype=torch.float64)
    grads = []
    for scale in (1.0, 2.0):
        y = layer(x)
        w = [layer.index_q_proj.weight, layer.index_k_proj.weight, layer.q_proj.weight]
        grads.append(torch.autograd.grad((scale * y).sum(), w))
    # the index branch only receives the KL gradient (selection is not differentiable) ...
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-14)
    # ... while the main branch follows the output gradient
    torch.testing.assert_close(2 * grads[0][2], grads[1][2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_kl_does_not_reach_the_backbone(mode):
    """Stop-gradient on the index branch input: the input's gradient (and the main
    projections') is the same with and without the indexer KL."""
    from dataclasses import replace
    grads = []
    for coeff in (0.0, 5.0):
        torch.manual_seed(0)
        layer = MSAttention(96, replace(CFG, kl_loss_coeff=coeff), rotary_dim=32).double()
        x = torch.randn(1, 260, 96, dtype=torch.float64, requires_grad=True)
        y, aux = layer.train()(x, mode=mode, return_aux=True)
        y.pow(2).sum().backward()
        grads.append((x.grad, layer.q_proj.weight.grad, layer.index_q_proj.weight.grad))
        assert (aux.kl_loss is not None and aux.kl_loss > 0) == (coeff > 0)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    assert grads[1][2].abs().sum() > 0                   # the KL trains the index branch


def test_sparse_equals_dense_when_everything_is_selected():
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=8)
    torch.manual_seed(0)
    layer = MSAttention(96, cfg).double().eval()
    x = torch.randn(2, 500, 96, dtype=torch.float64)       # 8 blocks: top-8 selects all
    torch.testing.assert_close(layer(x, mode="sparse"), layer(x, mode="dense"),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [[200, 1, 1, 3, 1], [64, 64, 1]])
def test_cached_decoding_matches_full_forward(steps):
    layer = _layer(rotary_dim=32).eval()
    x = torch.randn(2, sum(steps), 96, dtype=torch.float64)
    full = layer(x)
    cache, outs, t = KVCache(), [], 0
    for n in steps:
        outs.append(layer(x[:, t:t + n], cache=cache))
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.length(0) == sum(steps)


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rotary_dim"):
        MSAttention(96, CFG, rotary_dim=65)
    with pytest.raises(ValueError, match="hidden_states"):
        _layer()(torch.randn(10, 96, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, T, hidden=96\]"):
        _layer()(torch.randn(2, 10, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="hidden_states must be floating point"):
        _layer()(torch.ones(2, 10, 96, dtype=torch.long))
    with pytest.raises(TypeError, match="config must be an msa.MSAConfig"):
        MSAttention(96, CFG.__dict__)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        _layer()(torch.randn(2, 10, 96, dtype=torch.float64), cache={})


def test_paged_cache_of_another_config_is_rejected():
    from dataclasses import replace
    from msa.inference import PagedKVCache
    cache = PagedKVCache.for_model(replace(CFG, topk=CFG.topk + 1), num_layers=1, batch=1,
                                   num_pages=8, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="PagedKVCache was made for"):
        _layer().eval()(torch.randn(1, 10, 96, dtype=torch.float64), cache=cache)
    cache = PagedKVCache.for_model(replace(CFG, kl_loss_coeff=0.5), num_layers=1, batch=1,
                                   num_pages=8, dtype=torch.float64)
    with torch.no_grad():                               # the KL weight is training's only
        assert _layer().eval()(torch.randn(1, 10, 96, dtype=torch.float64),
                               cache=cache).shape == (1, 10, 96)


def test_contiguous_cache_rejects_another_batch():
    layer, cache = _layer().eval(), KVCache()
    with torch.no_grad():
        layer(torch.randn(2, 10, 96, dtype=torch.float64), cache=cache)
        with pytest.raises(ValueError, match="KVCache layer 0 holds k of batch 2"):
            layer(torch.randn(3, 1, 96, dtype=torch.float64), cache=cache)
        assert cache.length(0) == 10                    # the failed step appended nothing


def test_paged_cache_matches_contiguous_cache():
    from msa.inference import PagedKVCache
    layers = [_layer(seed=i, rotary_dim=32, layer_idx=i).eval() for i in range(2)]
    x = torch.randn(2, 300, 96, dtype=torch.float64)
    steps = [(0, 200), (200, 201), (201, 202), (202, 206), (206, 300)]  # prefill, decode, MTP
    kv = KVCache()
    paged = PagedKVCache.for_model(CFG, num_layers=2, batch=2, num_pages=16,
                                   dtype=torch.float64)
    with torch.no_grad():
        for a, b in steps:
            ref, got = x[:, a:b], x[:, a:b]
            for layer in layers:                     # two layers share one step's plan
                ref, got = layer(ref, cache=kv), layer(got, cache=paged)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert paged.length(0) == paged.length(1) == 300 == paged.lengths[0]


@pytest.mark.gpu
def test_paged_cache_decoder_path_plans_once_per_step(monkeypatch):
    from msa.inference import PagedDecoder, PagedKVCache
    torch.manual_seed(0)
    layers = [MSAttention(96, CFG, layer_idx=i).cuda().bfloat16().eval() for i in range(3)]
    x = torch.randn(2, 400, 96, device="cuda", dtype=torch.bfloat16)
    kv = KVCache()
    paged = PagedKVCache.for_model(CFG, num_layers=3, batch=2, num_pages=16,
                                   dtype=torch.bfloat16, device="cuda")
    plans = []
    plan = PagedDecoder.plan
    monkeypatch.setattr(PagedDecoder, "plan", lambda self, *a: plans.append(1) or plan(self, *a))
    with torch.no_grad():
        for a, b in [(0, 390), (390, 391), (391, 395), (395, 396)]:   # t <= 16: PagedDecoder
            ref, got = x[:, a:b], x[:, a:b]
            for layer in layers:
                ref, got = layer(ref, cache=kv), layer(got, cache=paged)
            torch.testing.assert_close(got.float(), ref.float(), rtol=3e-2, atol=3e-2)
    assert len(plans) == 3                           # one per decode step, not per layer
