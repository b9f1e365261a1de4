"""The command line: one installed command for every stage, help that lists every key, the resolved
config said at start."""
import logging
import subprocess
import sys

from llmemb_dist.cli import STAGES, changed_keys, entry
from llmemb_dist.config import key_help, load_config

from conftest import REPO


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    assert entry(["rat", "--help"]) == 0
    out = capsys.readouterr().out
    rows = key_help()
    assert len(rows) > 90 and all(meaning for *_, meaning in rows)  # every key says what it is
    for key, kind, default, meaning in rows:
        assert f"  {key} " in out and f"{kind}, default {default}: {meaning}" in out


def test_unknown_stage_and_no_stage(capsys):
    assert entry(["bogus"]) == 2 and "usage: llmemb {" + "|".join(STAGES) + "}" in capsys.readouterr().err
    assert entry([]) == 0 and "usage: llmemb" in capsys.readouterr().out


def test_start_line_names_what_differs_from_the_defaults(tmp_path, caplog):
    cfg = load_config(REPO / "configs" / "default.yaml", [f"root={tmp_path}", "rat.epochs=3"])
    said = changed_keys(cfg)
    assert f"root={tmp_path}" in said and "rat.epochs=3" in said and "rat.hidden" not in said
    with caplog.at_level(logging.INFO, logger="llmemb_dist"):
        assert entry(["cleanup", str(REPO / "configs" / "default.yaml"), f"root={tmp_path}"]) == 0
    assert f"cleanup with {REPO / 'configs' / 'default.yaml'}: " in caplog.text and f"root={tmp_path}" in caplog.text


def test_python_dash_m_runs_a_stage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmemb_dist", "cleanup", str(REPO / "configs" / "default.yaml"),
                          f"root={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "0 unreferenced transaction folders" in out.stderr
