"""Training entry point for every launcher: ``folora-ds train`` with the same arguments, once per process.

    python launch/train.py [options]                                              # one process
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json [options]
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json [options]
    mpirun -np 2 python launch/train.py --deepspeed ds_configs/zero2.json [options]
"""

import sys

from folora_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
