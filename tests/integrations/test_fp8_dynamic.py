"""The e4m3 dynamic cache for Llama-family models (``fp8_dynamic_cache``), on a tiny random
Llama with MSA self-indexing (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from msa.integrations.transformers import (enable_msa, fp8_dynamic_cache,  # noqa: E402
                                           msa_attention_forward)
from msa.integrations.transformers.compat import cache_kwarg  # noqa: E402
from msa.integrations.transformers.fp8_dynamic import FP8DynamicLayer  # noqa: E402
from msa.ops.quant import E4M3, dequantize, fake_quantize  # noqa: E402


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=4096)
    return enable_msa(transformers.LlamaForCausalLM(cfg).eval(), block_size=64, topk=4)


def test_layer_stores_e4m3_rows_and_returns_them_dequantized():
    layer = FP8DynamicLayer()
    k1, v1 = torch.randn(2, 3, 5, 16) * 4, torch.randn(2, 3, 5, 16)
    k2, v2 = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16) * 100
    layer.update(k1, v1)
    keys, values = layer.update(k2, v2)
    assert layer.keys8.dtype == E4M3 and layer.keys8.shape == (2, 3, 6, 16)
    assert layer.key_scales.shape == (2, 3, 6) and layer.get_seq_length() == 6
    assert keys.dtype == k1.dtype
    assert torch.equal(keys, fake_quantize(torch.cat([k1, k2], 2)))
    assert torch.equal(values, fake_quantize(torch.cat([v1, v2], 2)))
    assert not torch.equal(keys, torch.cat([k1, k2], 2))
    assert layer.keys.shape[2] == layer.values.shape[2] == 0     # no full-precision copy kept
    layer.crop(-2)
    assert layer.keys8.shape[2] == layer.key_scales.shape[2] == layer.get_seq_length() == 4
    keys, _ = layer.update(k2, v2)                             # appends after the cropped rows
    assert torch.equal(keys, fake_quantize(torch.cat([k1[:, :, :4], k2], 2)))
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([1, 0]))


def test_non_finite_rows_are_rejected_by_name():
    layer = FP8DynamicLayer()
    k = torch.randn(1, 2, 3, 8)
    k[0, 1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="keys"):
        layer.update(k, torch.randn(1, 2, 3, 8))
    v = torch.randn(1, 2, 3, 8)
    v[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="values"):
        FP8DynamicLayer().update(torch.randn(1, 2, 3, 8), v)


def _quantized_kv_attention(module, query, key, value, attention_mask, **kw):
    """MSA over keys and values rounded as an e4m3 cache rounds them (no cache)."""
    return msa_attention_forward(module, query, fake_quantize(key), fake_quantize(value),
                                 attention_mask, **kw)


def test_generate_with_the_fp8_cache_attends_over_quantized_keys():
    model = _model()
    ids = torch.randint(0, 200, (1, 900), generator=torch.Generator().manual_seed(1))
    fp8, plain = fp8_dynamic_cache(model), transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        name = cache_kwarg(model)
        out8 = model.generate(ids, max_new_tokens=6, do_sample=False, **{name: fp8})
        out = model.generate(ids, max_new_tokens=6, do_sample=False, **{name: plain})
        logits8 = model(ids, **{name: fp8_dynamic_cache(model)}).logits
        logits = model(ids).logits
        transformers.AttentionInterface.register("msa_quantized_kv", _quantized_kv_attention)
        model.set_attn_implementation("msa_quantized_kv")
        want = model(ids).logits
    assert out8.shape == out.shape == (1, 906)
    # layer 0 sees the same embeddings: its cached keys are the plain ones, quantized
    layer = fp8.layers[0]
    assert layer.keys8.shape[2] == fp8.get_seq_length() == 905
    assert torch.equal(dequantize(layer.keys8, layer.key_scales),
                       fake_quantize(plain.layers[0].keys))
    assert torch.equal(dequantize(layer.values8, layer.value_scales),
                       fake_quantize(plain.layers[0].values))
    # the prefill attends (and self-indexes) over the quantized keys and values
    torch.testing.assert_close(logits8, want, rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(logits8.flatten(), logits.flatten(), dim=0)
    assert cos > 0.99 and not torch.equal(logits8, logits)
