"""Two CPU (gloo) processes under torchrun memorise a text exactly as one process does: chunks in order, each chunk's
scored tokens split between the ranks, their gradients summed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_model

from peft_locas import LocasConfig
from peft_locas.engine.memorization import MemorizeConfig, evaluate, memorize

TESTS = Path(__file__).parent


def run():
    """The run every rank makes (7 chunks, one of 21 tokens so the ranks' shares differ), then a scoring pass."""
    ids = torch.randint(1, VOCAB, (117,), generator=torch.Generator().manual_seed(0))
    config = MemorizeConfig(chunk_tokens=16, context_tokens=8, steps_per_chunk=2, lr=1e-2, compare_baseline=True)
    result = memorize(tiny_model(), None, ids, config, peft_config=LocasConfig(r=8))
    return result, evaluate(result.model, None, ids, chunk_tokens=16, context_tokens=8)


def test_two_gloo_ranks_equal_a_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(TESTS / "memorize_distributed_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, scored = run()
    finally:
        torch.set_num_threads(threads)
    reference = {k: v.detach() for k, v in get_peft_model_state_dict(single.model).items()}
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    weights = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    assert ranks[0] == ranks[1]  # every rank reports the same (all-reduced) losses
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in reference), "the ranks' memories differ"
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert ranks[0]["baseline_losses"] == pytest.approx(single.baseline_losses, rel=1e-5)
    assert ranks[0]["scored"] == pytest.approx(scored.losses, rel=1e-5)
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[0][key], tensor, atol=1e-5, rtol=1e-4, msg=key)
