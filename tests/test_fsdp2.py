"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on two CPU (gloo) ranks trains, clips and saves a Locas memory exactly
as one process does: the sharded memory rows are whole rows on each rank (FSDP2 shards dim 0), so clipping acts on
what the optimiser updates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp2_worker import batches, make_model, train
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

TESTS = Path(__file__).parent


@pytest.mark.usefixtures("one_thread")
def test_fsdp2_on_two_cpu_ranks_equals_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(TESTS / "fsdp2_worker.py"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    model = make_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, optimizer, slice(0, 4))
    reference = get_peft_model_state_dict(model)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and len(batches()) == 4
    for key, tensor in reference.items():
        torch.testing.assert_close(saved[key], tensor.detach(), atol=1e-5, rtol=1e-4, msg=key)
        if key.endswith(("gate", "key", "value")):
            norms = saved[key].norm(dim=1)  # clipped through the shards: at most max_norm, and reached
            assert norms.max() <= 0.05 + 1e-6 and (norms > 0.0499).any(), key
