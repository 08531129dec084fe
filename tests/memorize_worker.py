"""Interrupted and resumed memorisation runs in their own processes, for the resume test in test_memorize.py.

Usage: python memorize_worker.py ROOT [KILL_AFTER_CHUNKS]
For each adapter type in ``ADAPTERS`` the run checkpoints into ROOT/<adapter>/checkpoints. With KILL_AFTER_CHUNKS,
the Locas run is interrupted by an exception and the process then SIGKILLs itself during the LoRA run, both right
after that many chunks (a kill leaves no chance for any cleanup). Without it the runs complete (resuming whatever
they find) and write ROOT/<adapter>/result.json and ROOT/<adapter>/adapter.safetensors.
"""

import json
import os
import signal
import sys
from pathlib import Path

from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_memorize import worker_run

ADAPTERS = ("locas", "lora")


class Interrupted(Exception):
    pass


def main(root: Path, kill_after: int | None = None) -> None:
    for adapter in ADAPTERS:
        folder = root / adapter

        def callback(index, result, adapter=adapter):
            if index + 1 == kill_after:
                if adapter == ADAPTERS[-1]:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise Interrupted

        try:
            result = worker_run(adapter, folder / "checkpoints", callback)
        except Interrupted:
            continue
        (folder / "result.json").write_text(json.dumps(result.to_dict()))
        weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(result.model).items()}
        save_file(weights, folder / "adapter.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
