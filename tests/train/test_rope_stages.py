"""A context-extension stage switches the model's RoPE when it begins, and a resume into
that stage restores it (RoPE frequencies are not in the checkpoint)."""

from __future__ import annotations

import logging

import pytest

from phoenix.config import RopeConfig, build_config
from phoenix.monitor.base import Callback
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict

STAGE2_ROPE = {"base": 100000.0, "scaling": "yarn", "factor": 2.0,
               "original_max_position_embeddings": 32}


class RopeRecorder(Callback):
    """Per step: the stage, the chunk's RopeConfig, the frequencies its rotary module
    applies at the stage's length, and yarn's factor on the TransformerConfig."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, metrics) -> None:
        from phoenix.model import current_rope
        from phoenix.model.rope import rope_module_inv_freq, unwrap

        stage = metrics.stage
        chunk = trainer.model[0]
        self.steps.append({
            "step": metrics.step, "stage": stage.name, "loss": metrics.loss,
            "rope": current_rope(chunk),
            "inv_freq": rope_module_inv_freq(chunk, stage.seq_length).tolist(),
            "yarn_factor": getattr(unwrap(chunk).config, "yarn_rotary_scaling_factor", None)})


def train_recording_rope(config: dict) -> list[dict]:
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config)
    trainer = Trainer(cfg, init_runtime(cfg))
    recorder = RopeRecorder()
    trainer.callbacks.append(recorder)
    trainer.setup()
    trainer.train()
    return recorder.steps


def _config(tiny_data, out, **train):
    mix = {"web": 0.7, "code": 0.3}
    return tiny_config_dict(
        tiny_data, out, train={"steps": None, "global_batch_size": 4, **train},
        optim={"warmup_steps": 1, "lr": 3e-3},
        checkpoint={"save_at_end": True},
        stages=[{"name": "short", "steps": 2, "seq_length": 32, "mixture": mix},
                {"name": "long", "steps": 2, "seq_length": 64, "mixture": mix,
                 "rope": STAGE2_ROPE}])


@pytest.mark.slow
def test_stage_switches_rope_and_resume_restores_it(tiny_data, tmp_path):
    from phoenix.model.rope import inv_freq_and_scaling

    head_dim = 16  # tiny preset: hidden 64, 4 heads
    stage2 = RopeConfig(**STAGE2_ROPE)
    expected = {"short": inv_freq_and_scaling(RopeConfig(), head_dim)[0].tolist(),
                "long": inv_freq_and_scaling(stage2, head_dim)[0].tolist()}

    (full,) = run_distributed(train_recording_rope, 1, _config(tiny_data, tmp_path / "full"))
    assert [s["stage"] for s in full] == ["short", "short", "long", "long"]
    for s in full:
        assert s["rope"] == (RopeConfig() if s["stage"] == "short" else stage2)
        assert s["inv_freq"] == pytest.approx(expected[s["stage"]], rel=1e-6)
        assert s["yarn_factor"] == (2.0 if s["stage"] == "long" else None)

    # Stop inside stage 2 (a checkpoint at step 3), then resume: the model is rebuilt
    # with model.rope and must get stage 2's rope back before step 4.
    out = tmp_path / "resumed"
    (first,) = run_distributed(train_recording_rope, 1, _config(tiny_data, out, stop_at_step=3))
    assert [s["step"] for s in first] == [1, 2, 3]
    (second,) = run_distributed(train_recording_rope, 1, _config(tiny_data, out))
    assert [s["step"] for s in second] == [4]
    assert second[0]["rope"] == stage2 and second[0]["yarn_factor"] == 2.0
    assert second[0]["inv_freq"] == pytest.approx(expected["long"], rel=1e-6)
    assert second[0]["loss"] == pytest.approx(full[3]["loss"], rel=1e-6)


def test_stage_beyond_its_rope_coverage_warns(tiny_data, tmp_path, caplog):
    config = _config(tiny_data, tmp_path)
    config["stages"][1]["rope"] = {**STAGE2_ROPE, "factor": 1.5}  # covers 48 < 64
    with caplog.at_level(logging.WARNING, logger="phoenix.config.stage_table"):
        build_config(config)
    assert any("stages[1].seq_length: stage 'long' trains on 64 tokens per sample, beyond the "
               "48 its rope yarn(base=100000, factor=1.5, L=32) covers" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
