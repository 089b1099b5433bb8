"""Configuration: defaults, overrides, and errors that name every bad key at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from organizer.config import ConfigError, load_config

from .conftest import ROOT, run_organizer


def test_example_config_is_valid_and_matches_defaults():
    example = load_config(ROOT / "config.example.toml")
    assert example.model_dump() == load_config(None).model_dump()


def test_all_errors_reported_with_key_names(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[clustering]\neps = -1\nmin_samples = "many"\n[detection]\nmodel = "magic"\n'
        '[service]\nlink_mode = "teleport"\nunknown_key = 3\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    text = str(err.value)
    for key in ("clustering.eps", "clustering.min_samples", "detection.model", "service.link_mode",
                "service.unknown_key"):
        assert key in text, text
    assert len(err.value.errors) == 5


def test_flags_override_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[paths]\nwatch = "/a"\noutput = "/b"\n')
    s = load_config(cfg, {"paths.output": "/c"})
    assert s.paths.watch == Path("/a") and s.paths.output == Path("/c")
    assert s.db_path == Path("/c/.organizer/organizer.db")


def test_config_check_cli(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[clustering]\neps = 0.45\n")
    ok = run_organizer("config", "check", "--config", str(good))
    assert '"eps": 0.45' in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[clustering]\neps = 7\n[service]\nworkers = -2\n")
    proc = run_organizer("config", "check", "--config", str(bad), check=False)
    assert proc.returncode == 1
    assert "clustering.eps" in proc.stderr and "service.workers" in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[clustering\n")
    proc = run_organizer("config", "check", "--config", str(broken), check=False)
    assert proc.returncode == 1 and "not valid TOML" in proc.stderr
    proc = run_organizer("config", "check", "--config", str(tmp_path / "missing.toml"), check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr


def test_watch_equal_output_rejected():
    with pytest.raises(ConfigError, match="different folders"):
        load_config(None, {"paths.watch": "/x", "paths.output": "/x"})
