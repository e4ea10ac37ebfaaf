"""``phoenix train --dry-run`` runs the ``init_from`` checks the real start makes (issue
23): a model that does not match the source checkpoint (another layer count, another
width) is refused from the checkpoint's metadata, before any model is allocated."""

from __future__ import annotations

import pytest
import yaml

from phoenix.cli import main as phoenix
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tiny_data, tmp_path_factory):
    """Two steps of the tiny model (4 layers, hidden 64, ffn 176), saved at the end."""
    out = tmp_path_factory.mktemp("dry_init") / "source"
    cfg = tiny_config_dict(tiny_data, out, train={"steps": 2}, optim={"warmup_steps": 1},
                           checkpoint={"save_at_end": True})
    run_distributed(train_and_record, 1, cfg)
    return out


def _dry_run(tiny_data, tmp_path, monkeypatch, source, *overrides):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    recipe = tmp_path / "cont.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config_dict(
        tiny_data, tmp_path / "cont", checkpoint={"init_from": str(source)})))
    return phoenix(["train", str(recipe), *overrides, "--dry-run"])


@pytest.mark.parametrize("override,difference", [
    ("model.num_layers=2", "layers 4 in the checkpoint, 2 in this run's model"),
    ("model.ffn_hidden_size=192", "ffn_hidden_size 176 in the checkpoint, 192 in this run's "
                                  "model"),
])
def test_dry_run_refuses_a_model_that_does_not_match_init_from(
        tiny_data, source, tmp_path, monkeypatch, capsys, override, difference):
    assert _dry_run(tiny_data, tmp_path, monkeypatch, source, override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"phoenix: config error: checkpoint.init_from: the model config does not "
                   f"match checkpoint {source}/checkpoints/step_000002: {difference} (compare "
                   f"model.* with {source}/checkpoints/step_000002/config.yaml)"]


def test_dry_run_accepts_the_matching_model(tiny_data, source, tmp_path, monkeypatch, capsys):
    assert _dry_run(tiny_data, tmp_path, monkeypatch, source) == 0
    assert "# would init from" in capsys.readouterr().err
