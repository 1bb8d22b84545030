"""``speechinstruct`` on a device that runs out of memory: a test shim, launched in place of the CLI
(``accelerate launch --multi_gpu --num_processes 2 tests/oom_on_cpu.py train ...``).

In the process of rank ``$OOM_RANK``, a pass (training or validation) over more than ``$OOM_ABOVE`` examples raises
torch's ``OutOfMemoryError``, as a GPU with too little memory does. ``$OOM_AT`` (``N:forward`` or ``N:backward``,
several separated by commas) makes that process's Nth training pass (counted from 1, the tries before the first step
included) run out of memory once, in its forward or its backward pass, whatever its size: memory that a moment's
fragmentation left too short, mid-training. ``$OOM_IN``: ``validation`` or ``training`` limits ``$OOM_ABOVE`` to those passes (both
when unset). With ``$OOM_ONCE_FILE``, ``$OOM_AT`` fires only while that file is not there, and makes it: once
over the launcher's restarts of the processes. Each process writes the number of examples of its training passes, one a line, to
``$OOM_PASSES/passes-RANK.txt``. Nothing else changes: the model, the loop and the saving are the product's own."""
import os
import sys

import torch
from transformers import LlamaForCausalLM

_forward = LlamaForCausalLM.forward
_passes = 0


def _out_of_memory(where="forward"):
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected in a {where} pass)")


class _FailsBackward(torch.autograd.Function):
    """The identity, whose backward pass runs out of memory (after the layers nearer the loss have run theirs)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise _out_of_memory("backward")


def _forward_that_runs_out_of_memory(self, *args, **kwargs):
    global _passes
    rank, examples = int(os.environ.get("RANK", "0")), kwargs["input_ids"].shape[0]
    ours = rank == int(os.environ["OOM_RANK"])
    at = dict(item.split(":") for item in os.environ.get("OOM_AT", "0:").split(","))  # {"N": "forward"}
    if torch.is_grad_enabled():
        _passes += 1
        with open(os.path.join(os.environ["OOM_PASSES"], f"passes-{rank}.txt"), "a") as f:
            f.write(f"{examples}\n")
    kind = os.environ.get("OOM_IN", "")
    if ours and examples > int(os.environ["OOM_ABOVE"]) and kind != ("validation" if torch.is_grad_enabled() else "training"):
        raise _out_of_memory()
    where = at.get(str(_passes)) if ours and torch.is_grad_enabled() else None
    once = where is not None
    marker = os.environ.get("OOM_ONCE_FILE")
    if once and marker:
        once = not os.path.exists(marker)
        open(marker, "a").close()
    if once and where == "forward":
        raise _out_of_memory()
    if once and where == "backward":  # halfway down the layers: some gradients are already there
        layer = self.model.layers[len(self.model.layers) // 2]
        hook = layer.register_forward_hook(lambda module, inputs, output: _FailsBackward.apply(output)
                                           if torch.is_tensor(output) else (_FailsBackward.apply(output[0]), *output[1:]))
        try:
            return _forward(self, *args, **kwargs)
        finally:
            hook.remove()
    return _forward(self, *args, **kwargs)


LlamaForCausalLM.forward = _forward_that_runs_out_of_memory

if __name__ == "__main__":
    from speechinstruct.cli import main

    sys.exit(main())
