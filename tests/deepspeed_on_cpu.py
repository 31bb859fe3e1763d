"""Run a trainer with DeepSpeed on CPU, for the tests (under torchrun):

    torchrun --nproc_per_node 2 tests/deepspeed_on_cpu.py fastchat.train.train ... --deepspeed CONFIG

The trainers refuse --deepspeed without a CUDA GPU (on CPU it gains nothing); this lifts that refusal and starts
deepspeed.comm first, as accelerate does on GPUs (on CPU it only starts torch.distributed, and ZeRO-3's sharded
model loading would then see one rank)."""
import os
import runpy
import sys

import deepspeed

import fastchat.train.common

fastchat.train.common.check_deepspeed = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)  # alter_sys: checkpoints pickle the argument class
# Everything is written. Skip Python's finalization: gloo's worker thread may still be dropping the last collective's
# tensors, and taking the GIL during finalization kills the process (std::terminate; seen about once in 8 runs).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
