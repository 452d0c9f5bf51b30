"""Everything that talks across ranks: collectives, ownership, ZeRO partition layouts, statistics reduction.

This package is the only place in folora_ds that calls collectives (through ``deepspeed.comm``); the math in
``folora_ds.method`` (spectral, flat_partitions, gated_adamw) receives plain callables.
"""
