"""Two "nodes" on localhost: two torchrun agents (``--nnodes 2``, one worker each, c10d
rendezvous on 127.0.0.1), started together, each in its own working directory.

* a node-local ``data.cache_dir`` (a relative path) works: each node builds its own copy of
  the (deterministic) data plan; training, checkpointing and resuming into the shared
  output_dir work as on one node;
* a node-local ``output_dir`` stops both nodes at start-up with one message naming the key,
  the hosts and the paths, instead of one node failing and the other waiting for the
  distributed timeout.
"""

import numpy as np
import pytest
import yaml

from phoenix.runtime.startup import RankView
from phoenix.runtime.ports import free_port
from phoenix.testing.processes import kill_tree, start, torchrun_args
from phoenix.testing.tiny import tiny_config_dict

# Far longer than the tests wait: a rank left waiting in a collective fails the test.
TIMEOUT_MINUTES = 10


def run_two_nodes(tmp_path, cfg: dict, tag: str, overrides=()) -> list[tuple[int, str]]:
    """Start both nodes at once; (exit code, log) of each."""
    path = tmp_path / "multinode.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port, procs = free_port(), []
    try:
        for n in (0, 1):
            cwd = tmp_path / "nodes" / f"node{n}"
            cwd.mkdir(parents=True, exist_ok=True)
            args = [*torchrun_args(1, nnodes=2, node_rank=n, port=port, run_id=tag),
                    "-m", "phoenix.train", path, *overrides]
            procs.append(start(args, tmp_path / f"{tag}-node{n}.log", cwd=cwd))
        codes = [p.wait(timeout=TIMEOUT_MINUTES * 60 - 60) for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    return [(code, (tmp_path / f"{tag}-node{n}.log").read_text()) for n, code in enumerate(codes)]


def multinode_config(tiny_data, output_dir, **sections):
    return tiny_config_dict(tiny_data, output_dir,
                            runtime={"device": "cpu", "distributed_timeout_minutes": TIMEOUT_MINUTES},
                            **sections)


@pytest.mark.slow
def test_two_nodes_with_node_local_cache_train_checkpoint_and_resume(tiny_data, tmp_path):
    cfg = multinode_config(tiny_data, tmp_path / "run", train={"steps": 4},
                           checkpoint={"save_interval": 0, "save_at_end": True})
    cfg["data"]["cache_dir"] = "local_cache"  # relative: node-local
    first = run_two_nodes(tmp_path, cfg, "first", ["train.stop_at_step=2"])
    for code, log in first:
        assert code == 0, log[-4000:]
    logs = "".join(log for _, log in first)
    assert "is not shared by every rank" in logs and "once per directory, by ranks [0, 1]" in logs
    assert logs.count("data plan: built") == 2  # once per node
    plans = [sorted((tmp_path / "nodes" / f"node{n}" / "local_cache").glob("plan-*"))
             for n in (0, 1)]
    assert len(plans[0]) == 1 and [p.name for p in plans[0]] == [p.name for p in plans[1]]
    files = sorted(f.name for f in plans[0][0].glob("*.npy"))
    assert "sample_ids.npy" in files and files == sorted(f.name for f in plans[1][0].glob("*.npy"))
    for name in files:  # the same plan on both nodes
        assert np.array_equal(np.load(plans[0][0] / name), np.load(plans[1][0] / name)), name
    # and the same sample indices, built once per node and memory-mapped by its ranks
    indices = [sorted(p.name for p in (tmp_path / "nodes" / f"node{n}" / "local_cache").glob("samples-*"))
               for n in (0, 1)]
    assert indices[0] and len(indices[0]) == len(indices[1])
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"

    second = run_two_nodes(tmp_path, cfg, "second")
    for code, log in second:
        assert code == 0, log[-4000:]
    logs = "".join(log for _, log in second)
    assert "resumed from" in logs and "step_000002" in logs
    assert "data plan: built" not in logs and logs.count("data plan: loaded") >= 2
    assert "step      4/4" in logs and "step      2/4" not in logs
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert not (tmp_path / "run" / ".phoenix.lock").exists()


@pytest.mark.slow
def test_two_nodes_with_node_local_output_dir_stop_at_once(tiny_data, tmp_path):
    cfg = multinode_config(tiny_data, "run")  # relative: each node gets its own
    results = run_two_nodes(tmp_path, cfg, "private")
    lines = []
    for code, log in results:
        assert code != 0, log[-4000:]
        lines += [x for x in log.splitlines() if "phoenix: config error: output_dir" in x]
        # no rank waited for a file or a collective that could not come
        assert "is built by rank 0" not in log and "timed out" not in log.lower()
    (line,) = lines  # once per job, by rank 0 (node 0)
    assert line.startswith("[rank 0] phoenix: config error: output_dir")
    assert "cannot see it" in line and "every node mounts at the same path" in line
    assert str(tmp_path / "nodes" / "node0" / "run") in line
    assert str(tmp_path / "nodes" / "node1" / "run") in line


def test_plan_builders_one_per_cache_directory():
    from phoenix.data.plan_cache import plan_builders

    views = [RankView(0, "a", "/shared", True), RankView(1, "a", "/shared", True),
             RankView(2, "b", "/local", False), RankView(3, "b", "/local", False),
             RankView(4, "c", "/local", False)]
    assert plan_builders(views) == [0, 2, 4]
    assert plan_builders(views[:2]) == [0]
