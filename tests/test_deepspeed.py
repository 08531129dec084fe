"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU ranks: `clip_memory_norms_()` clips the optimiser's own fp32 rows, so
training equals the single process (without it, the master rows drift past the bound: `peft_locas.weights.zero`).
Skipped where DeepSpeed is not installed (it is in the ``test`` extra)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp2_worker import make_model, train
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
TESTS = Path(__file__).parent


@pytest.mark.usefixtures("one_thread")
def test_zero_2_and_3_clip_what_the_optimiser_updates(tmp_path):
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(TESTS / "deepspeed_worker.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    model = make_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, optimizer, slice(0, 4))
    reference = {n.replace(".default", ""): p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for stage in (2, 3):
        saved = load_file(tmp_path / f"zero{stage}.safetensors")
        assert saved.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(saved[name], tensor, atol=1e-5, rtol=1e-4, msg=f"ZeRO-{stage} {name}")
            norms = saved[name].norm(dim=1)
            assert norms.max() <= 0.05 + 1e-6 and (norms > 0.0499).any(), f"ZeRO-{stage} {name}"
