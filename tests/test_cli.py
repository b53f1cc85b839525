"""The main job runs end to end and retrieves the needle."""
import json

from msa.cli import main


def test_demo_retrieves_needle(tmp_path, capsys):
    path = tmp_path / "demo.json"
    code = main(["demo", "--length", "3k", "--device", "cpu", "--no-progress",
                 "--json", str(path)])
    assert code == 0
    (r,) = json.loads(path.read_text())
    assert r["length"] == 3072 and r["needle_selected"] and r["retrieved"]
    assert r["max_err_vs_dense"] < 1e-4        # the needle dominates both attentions
    assert "selected" in capsys.readouterr().out
