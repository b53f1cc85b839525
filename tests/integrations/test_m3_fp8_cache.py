"""MiniMax-M3 in transformers with an FP8 static cache (``fp8_static_cache``): the sparse
layers store e4m3 rows with per-row scales, the attention reads them back exactly as
their dequantized values (reference path and fused decoder), bad input named."""
import pytest
import torch

pytest.importorskip("transformers.models.minimax_m3_vl")

from msa.integrations.transformers import enable_msa, fp8_static_cache  # noqa: E402
from msa.integrations.transformers.compat import cache_kwarg  # noqa: E402
from msa.integrations.transformers.minimax_m3 import IndexInputs, sparse_attention  # noqa: E402
from msa.ops.quant import E4M3, dequantize, fake_quantize  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402
from tests.integrations.test_minimax_m3 import _config, _models, m3  # noqa: E402


def _prompt(n, seed=1):
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def test_sparse_layers_hold_e4m3_rows_of_what_a_bf16_cache_holds():
    _, model = _models("G4-B64")                  # full, sparse, sparse
    from transformers import StaticCache
    ids = _prompt(200)
    fp8 = fp8_static_cache(model, 256)
    plain = StaticCache(config=model.config, max_cache_len=256)
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): fp8})
        model(ids, **{cache_kwarg(model): plain})
    assert type(fp8.layers[0]) is type(plain.layers[0])          # full attention: as is
    assert type(plain.layers[1]).__name__ == "MiniMaxM3VLSparseStaticCacheLayer"
    layer = fp8.layers[1]                          # first sparse layer: the same inputs
    assert layer.keys.dtype == E4M3 and layer.k_scales.shape == layer.keys.shape[:-1]
    assert layer.idx_keys.dtype == torch.float32 and layer.ki_scales is None
    for x8, s, want in ((layer.keys, layer.k_scales, plain.layers[1].keys),
                        (layer.values, layer.v_scales, plain.layers[1].values)):
        torch.testing.assert_close(dequantize(x8, s)[:, :, :200], fake_quantize(want[:, :, :200]),
                                   rtol=0, atol=0)
        assert not x8[:, :, 200:].view(torch.uint8).any()       # unwritten slots untouched
    assert int(layer.get_seq_length()) == 200


@pytest.mark.parametrize("index_dtype", [None, E4M3])
@pytest.mark.parametrize("tq,n", [(40, 200), (1, 200), (3, 130)])
def test_attention_on_fp8_rows_equals_attention_on_their_values(index_dtype, tq, n):
    """Prefill, decode and multi-token decode over an FP8 cache (reference backend)
    against the same layer on the dequantized rows (and e4m3-rounded index queries when
    the index keys are e4m3)."""
    _, model = _models("G4-B64")
    module = model.model.layers[1].self_attn
    cache = fp8_static_cache(model, 256, index_dtype)
    layer = cache.layers[1]
    g = torch.Generator().manual_seed(n + tq)
    k, v = torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g)
    ki = torch.randn(1, 1, n, 64, generator=g)
    key, value = layer.update(k, v)
    ki_all = layer.update_index(ki).transpose(1, 2)
    q = torch.randn(1, 8, tq, 64, generator=g)
    qi = torch.randn(1, tq, 2, 64, generator=g)
    pos = torch.arange(n - tq, n).view(1, -1)
    got = sparse_attention(module, q, key, value, IndexInputs(qi, ki_all, layer.scales()),
                           None, 0.125, pos)
    ks, vs, kis = layer.scales()
    want_ki = ki_all if kis is None else dequantize(ki_all, kis.transpose(1, 2))
    want_qi = qi if kis is None else fake_quantize(qi)
    want = sparse_attention(module, q, dequantize(key, ks), dequantize(value, vs),
                            IndexInputs(want_qi, want_ki), None, 0.125, pos)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    from msa.integrations.transformers.minimax_m3 import dequantized
    read = dequantized(key.transpose(1, 2)[:, :n], value.transpose(1, 2)[:, :n],
                       ki_all[:, :n], qi, layer.scales(), torch.float32)
    torch.testing.assert_close(read[3], want_qi, rtol=0, atol=0)    # e4m3 queries iff e4m3 keys
    torch.testing.assert_close(read[2], want_ki[:, :n], rtol=0, atol=0)
    # and near the unquantized rows
    plain = sparse_attention(module, q, torch.nn.functional.pad(k, (0, 0, 0, 256 - n)),
                             torch.nn.functional.pad(v, (0, 0, 0, 256 - n)),
                             IndexInputs(qi, torch.nn.functional.pad(
                                 ki, (0, 0, 0, 256 - n)).transpose(1, 2)), None, 0.125, pos)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), plain.flatten(), dim=0)
    assert cos > (0.99 if kis is None else 0.9), cos


@pytest.mark.parametrize("index_dtype", [None, E4M3])
def test_fused_decoder_reads_the_fp8_cache_in_place(monkeypatch, index_dtype):
    """Decoding through the fused decoder (Triton's interpreter on CPU) on the e4m3 rows
    gives the tokens of the reference path on their dequantized values."""
    pytest.importorskip("triton")
    from msa.integrations.transformers import decode
    calls = []
    fused = decode.fused_decode
    monkeypatch.setattr(decode, "fused_decode",
                        lambda *a, **kw: calls.append(kw["scales"]) or fused(*a, **kw))
    torch.manual_seed(0)
    ref = enable_msa(m3.MiniMaxM3VLForCausalLM(_config("G2-B128")).eval(),
                     backend="reference").to(DEVICE)
    torch.manual_seed(0)
    tri = enable_msa(m3.MiniMaxM3VLForCausalLM(_config("G2-B128")).eval(),
                     backend="triton").to(DEVICE)
    ids = _prompt(300, seed=5).to(DEVICE)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=3, do_sample=False,
                            **{cache_kwarg(ref): fp8_static_cache(ref, 384, index_dtype)})
        got = tri.generate(ids, max_new_tokens=3, do_sample=False,
                           **{cache_kwarg(tri): fp8_static_cache(tri, 384, index_dtype)})
    assert torch.equal(got, want)
    assert len(calls) == 2 and all(c[0] is not None for c in calls)   # 2 steps, FP8 pages
    assert all((c[2] is None) == (index_dtype is None) for c in calls)


def test_bad_input_is_named():
    eager, model = _models("G4-B64")
    with pytest.raises(ValueError, match="enable_msa"):
        fp8_static_cache(eager, 256)
    with pytest.raises(ValueError, match="max_cache_len"):
        fp8_static_cache(model, 0)
    with pytest.raises(ValueError, match="index_dtype"):
        fp8_static_cache(model, 256, torch.float16)
    with pytest.raises(TypeError, match="MiniMax-M3"):
        fp8_static_cache(torch.nn.Linear(2, 2), 256)
