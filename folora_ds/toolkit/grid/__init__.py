"""The comparison grid: methods × learning rates × seeds × steps, trained and measured the same way, cached,
resumable (``folora-ds grid``).

Modules, each importing only those above it:

- ``spec``: the JSON spec, its checks, and each run's identity (cache key, slug, resolved settings, data
  fingerprints). No model, no training.
- ``artifacts``: what runs share: the proxy set, C_pre, per-seed C_task and base evaluation computed once per grid
  folder (``SharedArtifacts``), and each seed's data and batch order (``TrainingData``).
- ``rows``: a grid folder read back: which runs are complete, their result rows, the questions each run lost,
  where each adapter moved (``direction_rows``).
- ``probe``: what the retention probe measures: its noise floor (random adapters at given KLs) and where each
  run's change sits (KL on the probe's answers vs on passages).
- ``records``: a grid's run records without their adapters, kept apart from its folder (committed beside the
  results; ``--records``): brought in before a grid resumes, written back after.
- ``runner``: training and measuring each run under its claim, and the grid loop (``run_grid``).
"""

from folora_ds.toolkit.grid.probe import noise_floor, probe_kl
from folora_ds.toolkit.grid.records import export_records, import_records
from folora_ds.toolkit.grid.rows import collect_rows, direction_rows, lost_questions
from folora_ds.toolkit.grid.runner import run_grid
from folora_ds.toolkit.grid.spec import load_spec

__all__ = ["collect_rows", "direction_rows", "export_records", "import_records", "load_spec", "lost_questions",
           "noise_floor", "probe_kl", "run_grid"]
