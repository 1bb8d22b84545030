"""``speechinstruct`` with accelerate's FSDP over CPU processes: a test shim, launched in place of the CLI
(``accelerate launch --use_fsdp --fsdp_version 2 tests/fsdp_on_cpu.py train ...``).

accelerate shards with FSDP over GPU processes only (its state falls back to DDP, ``MULTI_CPU``, on CPU
processes), while torch's FSDP2 shards over gloo on the CPU as well. This turns that fallback into FSDP, so that
train's FSDP path (sharded checkpoints, resuming from them, gathering the weights to save and merge) runs in CI,
which has no GPU. Nothing else changes: the model, the loop and the saving are the product's own."""
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _fsdp_over_cpu_processes(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP  # what accelerate does for MULTI_GPU with the same plugin
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = self.distributed_type


state.AcceleratorState.__init__ = _fsdp_over_cpu_processes

if __name__ == "__main__":
    from speechinstruct.cli import main

    sys.exit(main())
