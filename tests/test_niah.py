"""Kernel-level needle-in-a-haystack harness."""
import json

from msa.cli import main


def test_niah_grid_finds_the_needle_everywhere(tmp_path):
    path = tmp_path / "niah.json"
    assert main(["niah", "--length", "2k,5k", "--depths", "0,0.5,1", "--device", "cpu",
                 "--no-progress", "--json", str(path)]) == 0
    cells = json.loads(path.read_text())["cells"]
    assert len(cells) == 6
    for c in cells:
        assert c["selected"] == 1.0 and 0.99 <= c["recall"] <= 1.0 + 1e-6
        assert c["cosine"] > 0.99 and c["max_err"] < 1e-4
