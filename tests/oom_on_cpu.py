"""``speechinstruct`` on a device that runs out of memory: a test shim, launched in place of the CLI
(``accelerate launch --multi_gpu --num_processes 2 tests/oom_on_cpu.py train ...``).

In the process of rank ``$OOM_RANK``, a pass (training or validation) over more than ``$OOM_ABOVE`` examples raises
torch's ``OutOfMemoryError``, as a GPU with too little memory does. Each process writes the number of examples of
its training passes, one a line, to ``$OOM_PASSES/passes-RANK.txt``. Nothing else changes: the model, the loop and
the saving are the product's own."""
import os
import sys

import torch
from transformers import LlamaForCausalLM

_forward = LlamaForCausalLM.forward


def _forward_that_runs_out_of_memory(self, *args, **kwargs):
    rank, examples = int(os.environ.get("RANK", "0")), kwargs["input_ids"].shape[0]
    if torch.is_grad_enabled():
        with open(os.path.join(os.environ["OOM_PASSES"], f"passes-{rank}.txt"), "a") as f:
            f.write(f"{examples}\n")
    if rank == int(os.environ["OOM_RANK"]) and examples > int(os.environ["OOM_ABOVE"]):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    return _forward(self, *args, **kwargs)


LlamaForCausalLM.forward = _forward_that_runs_out_of_memory

if __name__ == "__main__":
    from speechinstruct.cli import main

    sys.exit(main())
