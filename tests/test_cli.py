"""The ``kdgate`` command (cli/): every command's help renders, ``--json`` output parses against a
real ledger, and the error paths end with a message and an exit status, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import typer

from cli.app import app, main
from store import Ledger


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command of the typer app, found by walking its click tree."""
    paths: list[tuple[str, ...]] = [()]

    def walk(command, path: tuple[str, ...]) -> None:
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            paths.append((*path, name))
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


COMMANDS = _command_paths()


def test_the_command_tree_keeps_every_command():
    # the names scripts outside the test suite call; a new command is covered by the help test on its own
    expected = {("serve",), ("stats",), ("distill",), ("distill-lm",), ("demo",),
                *(("keys", c) for c in ("create", "list", "limit", "revoke")),
                *(("routes", c) for c in ("list", "show", "set", "create", "rename")),
                *(("bench", c) for c in ("overhead", "replay", "learning-curve", "lm-student", "gpu-check", "soak",
                                         "crash", "dashboard", "decision", "lm-curve", "splits"))}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "kdgate")
def test_every_help_renders(path, capsys):
    assert main([*path, "--help"]) == 0
    out, err = capsys.readouterr()
    assert "Usage: kdgate" in out and " ".join(("kdgate", *path)) in out
    assert "Traceback" not in out + err


def test_help_imports_nothing_heavy():
    code = ("import sys, json; from cli.app import main; rc = main(['--help']); "
            "print(json.dumps([rc, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    rc, modules = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "transformers", "litellm", "numpy", "bench",
                                                                "gateway", "distiller", "router", "store", "uvicorn"))
    assert rc == 0 and not heavy, heavy


# -- a small ledger ------------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path) -> str:
    path = str(tmp_path / "ledger.db")
    ledger = Ledger(path)
    now = time.time()
    ledger.insert_rows("exchanges", [
        {"uid": uuid.uuid4().hex, "ts": now - i, "route": "triage", "served_by": "teacher", "status": 200,
         "latency_ms": 200.0, "cost_usd": 0.00012, "counterfactual_usd": 0.00012, "prompt_tokens": 20, "completion_tokens": 2}
        for i in range(2)])
    ledger.close()
    assert main(["routes", "create", "triage", "--db", path]) == 0
    return path


def _json(capsys, *argv: str):
    capsys.readouterr()
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_routes_json(db, capsys):
    [row] = _json(capsys, "routes", "list", "--db", db, "--json")
    assert set(row) == {"name", "teacher", "origin", "mode", "threshold", "target", "exchanges"}
    assert row["name"] == "triage" and row["exchanges"] == 2
    view = _json(capsys, "routes", "show", "triage", "--db", db, "--json")
    assert set(view) == {"name", "teacher", "origin", "settings", "exchanges", "template", "students"}
    changed = _json(capsys, "routes", "set", "triage", "threshold=0.42", "mode=cascade", "target_agreement=97%",
                    "--db", db, "--json")
    assert changed["settings"]["threshold"] == 0.42 and changed["settings"]["mode"] == "cascade"
    assert changed["settings"]["target_agreement"] == pytest.approx(0.97)
    assert _json(capsys, "routes", "show", "triage", "--db", db, "--json")["settings"]["threshold"] == 0.42
    renamed = _json(capsys, "routes", "rename", "triage", "triage-2", "--db", db, "--json")
    assert renamed["name"] == "triage-2" and renamed["exchanges"] == 2
    created = _json(capsys, "routes", "create", "other", "--teacher", "openai/gpt-4o", "--db", db, "--json")
    assert created["name"] == "other" and created["teacher"] == "openai/gpt-4o"


def test_keys_json_and_table(db, capsys):
    created = _json(capsys, "keys", "create", "team", "--routes", "triage,bank-*", "--db", db, "--json")
    assert set(created) == {"id", "name", "key", "routes"} and created["routes"] == ["triage", "bank-*"]
    limited = _json(capsys, "keys", "limit", "team", "--rpm", "60", "--budget-day", "0.5", "--db", db, "--json")
    assert limited["rpm"] == 60 and limited["budget_day_usd"] == 0.5 and limited["id"] == created["id"]
    [row] = _json(capsys, "keys", "list", "--db", db, "--json")
    assert set(row) == {"id", "name", "created", "revoked", "rpm", "tpm", "budget_day_usd", "budget_month_usd", "routes"}
    assert main(["keys", "list", "--db", db]) == 0
    table = capsys.readouterr().out
    header, _, line = table.splitlines()[:3]
    assert header.split() == ["id", "name", "created", "revoked", "rpm", "tpm", "budget_day_usd", "budget_month_usd", "routes"]
    assert created["id"] in line and "60" in line and "$0.5" in line and "triage,bank-*" in line
    assert re_iso(line)
    revoked = _json(capsys, "keys", "revoke", "team", "--db", db, "--json")
    assert revoked["revoked"] is not None


def re_iso(text: str) -> bool:
    import re

    return bool(re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z", text))


def test_stats_json_and_small_money(db, capsys):
    out = _json(capsys, "stats", "--db", db, "--json", "--since", "all")
    assert set(out) == {"overview", "routes"} and out["overview"]["totals"]["requests"] == 2
    assert main(["stats", "--db", db]) == 0
    text = capsys.readouterr().out
    assert "$0.00024" in text and "$0.00 " not in text  # two cents' digits would show nothing of it


def test_distill_list_json(db, capsys):
    assert _json(capsys, "distill", "--db", db, "--route", "triage", "--list", "--json") == []


def test_control_characters_are_escaped(db, capsys):
    ledger = Ledger(db)
    ledger.add_key("key_evil", "\x1b[31mred\x1b]0;title\x07[bold]", "h" * 64)
    ledger.close()
    capsys.readouterr()
    assert main(["keys", "list", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31mred" in out and "[bold]" in out


# -- error paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,status,message", [
    (["routes", "show", "nosuch"], 1, "no route named 'nosuch'"),
    (["routes", "set", "nosuch", "mode=cascade"], 1, "no route named 'nosuch'"),
    (["routes", "set", "triage", "threshold=abc"], 2, "threshold must be a number"),
    (["routes", "set", "triage", "mode=sideways"], 2, "invalid setting: mode"),
    (["routes", "set", "triage", "threshold=1.5"], 2, "invalid setting: threshold"),
    (["routes", "set", "triage", "colour=red"], 2, "unknown route setting 'colour'"),
    (["routes", "set", "triage", "threshold"], 2, "expected KEY=VALUE"),
    (["routes", "rename", "triage", "/x"], 2, "invalid route name '/x'"),
    (["routes", "rename", "triage", "ok\n"], 2, "invalid route name 'ok\\n'"),
    (["routes", "rename", "nosuch", "fine"], 1, "no route named 'nosuch'"),
    (["routes", "create", "bad name"], 2, "invalid route name 'bad name'"),
    (["keys", "revoke", "nobody"], 1, "no active key 'nobody'"),
    (["keys", "limit", "nobody", "--rpm", "5"], 1, "no key 'nobody'"),
    (["stats", "--since", "whenever"], 2, "24h"),
    (["distill", "--route", "triage", "--list", "--promote", "1"], 2, "mutually exclusive"),
    (["distill", "--route", "triage", "--config-json", '{"no_such_setting": 1}'], 2, "no_such_setting"),
    (["routes", "frobnicate"], 2, "No such command"),
])
def test_error_paths_end_with_a_message(db, capsys, argv, status, message):
    capsys.readouterr()
    assert main([*argv, "--db", db]) == status
    out, err = capsys.readouterr()
    assert message in err, err
    assert "Traceback" not in out + err


def test_a_settings_error_is_kdgate_colon_message_and_2(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.toml"), "routes", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdgate: Config file") and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text('port = "eighty"\n')
    assert main(["--config", str(bad), "routes", "list", "--db", str(tmp_path / "x.db")]) == 2
    assert capsys.readouterr().err.startswith("kdgate: Invalid kdgate settings")


def test_ctrl_c_exits_130(db, monkeypatch):
    import gateway.auth

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gateway.auth, "create_key", interrupted)
    assert main(["keys", "create", "x", "--db", db]) == 130


def test_no_command_shows_help(capsys):
    assert main([]) in (0, 2)
    assert "Usage: kdgate" in capsys.readouterr().out


def test_bench_decision_times_the_encoder_on_both_runtimes(tmp_path, monkeypatch, capsys):
    """``kdgate bench decision`` on a small stream: both runtimes timed at each length, what a cap
    would truncate, the results file written; a missing artifact is refused with a message."""
    from pathlib import Path

    import torch

    stream = Path(__file__).parent / "fixtures" / "banking77_small.jsonl"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDGATE_MODEL_CACHE", str(tmp_path / "models"))
    from router import embedding

    monkeypatch.setattr(embedding, "_runtime", "torch")  # the bench switches it to ONNX while it times
    mkldnn, runtime = torch.backends.mkldnn.enabled, embedding._runtime
    try:
        assert main(["bench", "decision", "--dataset", str(stream), "--requests", "3", "--lengths", "8,32", "--json"]) == 0
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    out = json.loads(capsys.readouterr().out)
    assert out["runtimes"] == ["torch", "onnx"] and out["encoder_cap_tokens"] == 256
    assert [p["tokens"] for p in out["points"]] == [8, 32]
    assert all(p["encoder_p50_ms"][r] > 0 for p in out["points"] for r in ("torch", "onnx"))
    assert set(out["share_longer_than"]) == {"8", "32"} and 0 < out["share_longer_than"]["8"] <= 1
    assert json.loads((tmp_path / "bench" / "results" / "decision.json").read_text())["points"] == out["points"]
    assert embedding._runtime == runtime  # the bench puts the process's runtime back

    assert main(["bench", "decision", "--dataset", str(stream), "--artifact", str(tmp_path / "nowhere")]) == 2
    assert "no student artifact" in capsys.readouterr().err


def test_bench_splits_compares_validation_splits_on_a_ledger(tmp_path, monkeypatch, capsys):
    """``kdgate bench splits`` on a small ledger and its stream: each split trains a candidate on the
    pairs up to the cut and serves the requests after it, scored against the stream's answers; a
    split it does not know, or a cut past the stream, is refused with a message."""
    from pathlib import Path

    from tests.distiller.conftest import seed_exchanges

    stream = Path(__file__).parent / "fixtures" / "banking77_small.jsonl"
    rows = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]
    ledger = Ledger(str(tmp_path / "replay.db"))
    seed_exchanges(ledger, "replay", rows)
    ledger.close()
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "splits", "--ledger", str(tmp_path / "replay.db"), "--dataset", str(stream), "--cutoffs", "160",
            "--horizon", "80", "--split", "newest", "--split", "holdout-plain"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(p["cutoff"], p["split"]) for p in out["points"]] == [(160, "newest"), (160, "holdout-plain")]
    for p in out["points"]:
        assert p["train_pairs"] + p["val_pairs"] == 160 and 0 <= p["certified_coverage"] <= 1
        assert 0 <= p["served"] <= 1 and 0 < p["agreement"] <= 1  # of the 80 requests after the cut
        assert p["served_agreement"] is None or 0 <= p["served_agreement"] <= 1
    newest = out["points"][0]
    assert newest["val_pairs"] == 32  # the newest fifth; the holdout's size is a hash's
    assert set(out["mean"]) == {"newest", "holdout-plain"}
    assert json.loads((tmp_path / "bench" / "results" / "splits.json").read_text())["points"] == out["points"]

    assert main([*argv[:-4], "--split", "sideways"]) == 2
    assert "unknown split" in capsys.readouterr().err
    assert main([*argv[:6], "--cutoffs", "400"]) == 2
    assert "no requests after it" in capsys.readouterr().err
