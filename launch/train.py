"""Entry point for ``python launch/train.py ...`` (the single-process FoLoRA run; see ``folora-ds train -h``)."""

import sys

from folora_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
