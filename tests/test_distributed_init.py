"""Under torch.distributed, every rank selects the same memory, equal to a single process seeing all ranks' data."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from distributed_init_worker import CASES, memories, shard

TESTS = Path(__file__).parent


def start_ranks(tmp_path: Path, *mode: str) -> tuple[list[subprocess.Popen], list[Path]]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    )
    env["OMP_NUM_THREADS"] = "1"
    outputs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    worker = [sys.executable, str(TESTS / "distributed_init_worker.py")]
    ranks = [
        subprocess.Popen(
            [*worker, str(rank), "2", str(tmp_path / "store"), str(out), *mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, out in enumerate(outputs)
    ]
    return ranks, outputs


def test_two_gloo_ranks_agree_with_a_single_process(tmp_path):
    ranks, outputs = start_ranks(tmp_path)
    logs = [process.communicate(timeout=240)[0] for process in ranks]
    assert all(process.returncode == 0 for process in ranks), "\n".join(log[-3000:] for log in logs)
    per_rank = [torch.load(out) for out in outputs]
    for case in CASES:
        single = memories(*case, shard(0) + shard(1))  # the ranks' data in rank order, as the slots are gathered
        assert per_rank[0][case].keys() == single.keys()
        for name, expected in single.items():
            assert torch.equal(per_rank[0][case][name], per_rank[1][case][name]), f"{case} {name}: ranks differ"
            torch.testing.assert_close(per_rank[0][case][name], expected, atol=1e-6, rtol=1e-5, msg=f"{case} {name}")


def test_an_error_on_one_rank_ends_every_rank_with_it(tmp_path):
    """Rank 1's batch is invalid: instead of rank 0 waiting forever in the statistics' all-reduce, both ranks fail."""
    ranks, _ = start_ranks(tmp_path, "bad")
    logs = [process.communicate(timeout=120)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [1, 1], "\n".join(logs)
    own = "init_locas_weights: batch 0 has no `input_ids` (got ['labels'])"
    errors = [[line for line in log.splitlines() if line.startswith("error: ")] for log in logs]
    assert errors[1] == [
        f"error: {own}; the dataloader must yield mappings with `input_ids` (and optionally "
        "`attention_mask`, `labels`), e.g. a tokenizer's output."
    ]
    assert errors[0] == [f"error: init_locas_weights: rank 1 failed: ValueError: {errors[1][0][len('error: ') :]}"]
