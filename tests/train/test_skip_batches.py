"""train.skip_batches: skipped steps consume their plan batch but train nothing.

Oracles: a run without the skip (the samples of every other step, the weights before
the skip, the LR of every step), the data plan rebuilt by ``phoenix inspect-batch``
(the provenance of the skipped batches), an uninterrupted run (a resume inside the
range), and the resume contract on the checkpoint's own config.
"""

import json

import pytest

from phoenix.config import ConfigError
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict


def _train(config: dict, overrides: list[str]) -> dict:
    """One job: per trained step its (dataset, sample, document) ids and LR, the weights
    after step 2 and before the update of step 5, and the final weights."""
    import torch

    from phoenix.config import build_config
    from phoenix.monitor.base import Callback
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    def weights(trainer):
        return torch.cat([p.detach().reshape(-1).clone() for c in trainer.model
                          for p in c.parameters()])

    class Watch(Callback):
        def __init__(self):
            self.steps, self.weights = {}, {}

        def on_before_optimizer_step(self, trainer):
            self.weights[f"before {trainer.state.step + 1}"] = weights(trainer)

        def on_step_end(self, trainer, m):
            r = trainer.batch_report
            self.steps[m.step] = {"lr": m.lr, **{k: r[k].tolist() for k in
                                                 ("dataset_id", "sample_id", "document_id")}}
            self.weights[f"after {m.step}"] = weights(trainer)

    cfg = build_config(config, overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    watch = Watch()
    trainer.callbacks.append(watch)
    trainer.setup()
    state = trainer.train()
    return {"steps": watch.steps, "weights": watch.weights, "final": weights(trainer),
            "step": state.step, "consumed_samples": state.consumed_samples}


def _runs(runs: list[tuple[dict, list[list[str]]]]) -> list[list[dict]]:
    """Each run's jobs (their overrides) one after the other, in one process."""
    return [[_train(config, overrides) for overrides in jobs] for config, jobs in runs]


@pytest.mark.slow
def test_skipped_steps_read_their_batch_and_train_nothing(tiny_data, tmp_path):
    from phoenix.checkpoint.resume_contract import check_resume
    from phoenix.checkpoint.store import checkpoint_root, find_latest
    from phoenix.cli.inspect_batch import batch_samples
    from phoenix.config import build_config

    def cfg(run, **train):
        return tiny_config_dict(tiny_data, tmp_path / run, train={"steps": 6, **train},
                                checkpoint={"save_at_end": False, "save_interval": 3})

    skip = "train.skip_batches=[[3,4]]"
    resumed = cfg("resumed")
    (plain,), (skipped,), (job1, job2) = run_distributed(_runs, 1, [
        (cfg("plain"), [[]]), (cfg("skipped"), [[skip]]),
        # a job that stops after skipping step 4 but saved at step 3, then its resume
        (resumed, [[skip, "train.stop_at_step=4"], [skip]])])[0]

    # The other steps read exactly the samples of the run without the skip, at its LR.
    assert sorted(skipped["steps"]) == [1, 2, 5, 6]
    for step in (1, 2, 5, 6):
        assert skipped["steps"][step] == plain["steps"][step]
    assert skipped["step"] == 6 and skipped["consumed_samples"] == plain["consumed_samples"]
    # Steps 3 and 4 changed no weight: step 5 starts from the weights after step 2.
    w = skipped["weights"]
    assert w["after 2"].equal(plain["weights"]["after 2"])
    assert w["before 5"].equal(w["after 2"])
    assert not w["after 5"].equal(plain["weights"]["after 5"])  # another starting point

    # The record: steps 3 and 4, the samples the run without the skip trained on there,
    # and what the plan (rebuilt by inspect-batch) holds.
    records = [json.loads(line) for line in
               (tmp_path / "skipped" / "skipped_batches.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4]
    for r in records:
        ids = plain["steps"][r["step"]]
        assert [s["dataset_id"] for s in r["samples"]] == ids["dataset_id"]
        assert [s["sample_id"] for s in r["samples"]] == ids["sample_id"]
        assert [s["document_id"] for s in r["samples"]] == ids["document_id"]
        info = batch_samples(tmp_path / "skipped", r["step"])
        assert info["skipped"] is True
        assert r["dataset_counts"] == {k: v for k, v in info["counts"].items() if v}
        assert [(s["dataset"], s["sample_id"]) for s in r["samples"]] == \
               [(s["dataset"], s["sample_id"]) for s in info["samples"]]
    assert batch_samples(tmp_path / "skipped", 5)["skipped"] is False

    # A resume inside the range: bit-identical to the uninterrupted run, and the record
    # of step 4 (written by the job that stopped after it) is not written twice.
    assert job1["step"] == 4 and sorted(job2["steps"]) == [5, 6]
    assert job2["final"].equal(skipped["final"])
    lines = (tmp_path / "resumed" / "skipped_batches.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 4]

    # The resume contract at the checkpoint of step 3: ranges after it may change,
    # not which of steps 1..3 were skipped.
    latest = find_latest(checkpoint_root(tmp_path / "resumed"))
    for ok in ("[[3,4]]", "[[3,6]]", "[[3,3],[5,5]]"):
        check_resume(latest, build_config(resumed, [f"train.skip_batches={ok}"]), 3)
    for refused in ("[[4,4]]", "[[2,4]]", "[]"):
        with pytest.raises(ConfigError, match=r"skip_batches: train.skip_batches: .* changes which "
                                              r"of steps 1\.\.3 were skipped"):
            check_resume(latest, build_config(resumed, [f"train.skip_batches={refused}"]), 3)


@pytest.mark.parametrize("ranges, error", [
    ("[[0,2]]", r"train.skip_batches\[0\]: \[0, 2\] starts before step 1"),
    ("[[1,2],[5,3]]", r"train.skip_batches\[1\]: \[5, 3\] has start > end"),
    ("[[5,7]]", r"train.skip_batches\[0\]: \[5, 7\] ends after the run's last step 6"),
    ("[[5]]", r"train.skip_batches\[0\]: expected \[start, end\]"),
])
def test_bad_ranges_are_refused_in_one_line(tiny_data, tmp_path, ranges, error):
    from phoenix.config import build_config

    with pytest.raises(ConfigError, match=error) as e:
        build_config(tiny_config_dict(tiny_data, tmp_path), [f"train.skip_batches={ranges}"])
    assert "\n" not in str(e.value)
