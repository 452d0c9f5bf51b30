"""Training entry point for every launcher.

    python launch/train.py [folora-ds train options]                       # one process, FoLoRA vs AdamW
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json [options]
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json [options]

With ``--deepspeed`` every rank runs ``folora-ds train-ds``; without it, ``folora-ds train``.
"""

import sys

from folora_ds.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    command = "train-ds" if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in arguments) else "train"
    sys.exit(main([command, *arguments]))
