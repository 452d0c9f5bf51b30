"""A grid's spec and each run's identity: parsing and checking the JSON spec, and the cache keys of its runs.

A grid is a JSON spec (``folora_ds/toolkit/grids/*.json``)::

    {"settings": {"model": "smollm2-135m-instruct", "batch_size": 8, ...},        # GridSettings, shared by all runs
     "runs": [{"label": "plain LoRA", "method": "lora", "lrs": [1e-4, 2e-4], "seeds": [0, 1, 2],
               "steps": [30, 60]},
              {"label": "FoLoRA", "method": "folora", "lrs": [4e-4], "seeds": [0, 1, 2], "steps": [60],
               "knobs": {"tau": 1.0}}]}

Every (entry, lr, seed) is one ``GridRun``. Its folder's name (``GridRun.slug``) holds a hash of everything that
determines it (``GridRun.identity``), so a changed setting is a new run and a finished run is never redone; what
it was made with in full (``resolved_settings``, data files by content) is recorded beside it, so a changed default
or an edited data file is caught too (``changed_settings``).

Nothing here loads a model or trains: a spec is checked completely before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from folora_ds.common.checks import is_integer, require_int, require_real
from folora_ds.common.files import read_json_file
from folora_ds.method.config import FoLoRAConfig, ProxyConfig
from folora_ds.toolkit.evaluation import EvaluationSettings
from folora_ds.toolkit.methods import check_method
from folora_ds.toolkit.report import MAIN_FIGURE, PLAIN_LABEL_METHOD, REFERENCE_LABEL
from folora_ds.training.data import DEFAULT_TASK_FILE

GRIDS_DIR = Path(__file__).parent.parent / "grids"
DATA_FILES_DIR = DEFAULT_TASK_FILE.parent
SPEC_VERSION = 1
BEST_ACCURACY_SHARE = 0.95  # "lrs": "best" = least KL among the rates at ≥ 95% of the top accuracy


@dataclass(frozen=True, kw_only=True)
class GridSettings:
    """What every run of a grid shares.

    Attributes:
        model: "smollm2-135m-instruct", "tiny-llama" or a local Hugging Face model directory.
        data: task training data (prompt/response or messages JSONL, or a saved ``datasets`` directory).
        batch_size: examples per optimizer step (one micro-batch).
        calibration_steps: the first steps' batches give the initial C_task (FoLoRA and the covariance baselines).
        lora_rank, lora_alpha, target_modules: the adapter of every method.
        max_seq_len: tokens per task example (longer ones are cut).
        proxy: how the proxy set is sampled from the model (once per grid), as FoLoRA's ``proxy`` block.
        evaluation: what each checkpoint is measured on (``folora_ds.toolkit.evaluation.EvaluationSettings``).
        sc_lora_beta: SC-LoRA's trade-off β.
    """

    model: str = "smollm2-135m-instruct"
    data: str = str(DEFAULT_TASK_FILE)
    batch_size: int = 8
    calibration_steps: int = 8
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] | str = FoLoRAConfig().target_modules
    max_seq_len: int = 256
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    sc_lora_beta: float = 0.5

    def __post_init__(self) -> None:
        for name in ("batch_size", "calibration_steps", "lora_rank", "max_seq_len"):
            require_int(name, getattr(self, name), where="grid settings: ")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.proxy.path is not None:
            raise ValueError("grid settings: proxy.path is set by the grid itself (shared/proxy.jsonl)")
        if not 0.0 <= self.sc_lora_beta <= 1.0:
            raise ValueError(f"grid settings: sc_lora_beta={self.sc_lora_beta!r} must be in [0, 1]")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GridSettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"grid settings: unknown key {unknown[0]!r}; known: {', '.join(sorted(fields))}")
        values = dict(values)
        if "proxy" in values:
            values["proxy"] = ProxyConfig(**values["proxy"])
        if "evaluation" in values:
            values["evaluation"] = EvaluationSettings(**values["evaluation"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if isinstance(self.target_modules, tuple):
            values["target_modules"] = list(self.target_modules)
        return values

    def identity(self) -> dict[str, Any]:
        """The settings that differ from their defaults (nested blocks too): what a run's cache key holds, so a
        setting added later with a default does not invalidate finished runs. A shipped data file is named
        ``"shipped:<name>"``, not by where the package is installed, so a clone elsewhere finds the same runs."""
        return portable_paths(_non_default(self))


@dataclass(frozen=True, kw_only=True)
class GridRun:
    """One training run: ``method`` at learning rate ``lr`` with ``seed``, measured after each of ``steps``.

    ``knobs`` are FoLoRA config overrides (method "folora" only); ``label`` names the group in tables and plots.
    ``proxy_sequences`` (method "folora" only) calibrates on the first N sequences of the grid's shared proxy set
    instead of all of them: the knob study's proxy size, on the same samples rather than a new draw.
    """

    label: str
    method: str
    lr: float
    seed: int
    steps: tuple[int, ...]
    knobs: Mapping[str, Any] = field(default_factory=dict)
    proxy_sequences: int | None = None

    def __post_init__(self) -> None:
        where = f"run {self.label!r}: "
        check_method(self.method)
        require_real("lr", self.lr, low=0.0, where=where)
        require_int("seed", self.seed, minimum=0, where=where)
        steps = tuple(self.steps)
        if not steps or any(not (is_integer(s) and s >= 1) for s in steps) or len(set(steps)) != len(steps):
            raise ValueError(f"{where}steps={self.steps!r} must be distinct integers >= 1")
        object.__setattr__(self, "steps", tuple(sorted(steps)))
        if self.knobs and self.method != "folora":
            raise ValueError(f"{where}knobs are FoLoRA settings; method {self.method!r} takes none")
        if self.method == "folora":
            FoLoRAConfig.from_dict(dict(self.knobs))  # a typo or bad value is named before any work
        if self.proxy_sequences is not None:
            if self.method != "folora":
                raise ValueError(f"{where}proxy_sequences is a FoLoRA setting; method {self.method!r} takes none")
            require_int("proxy_sequences", self.proxy_sequences, where=where)

    def identity(self, settings: GridSettings) -> dict[str, Any]:
        """Everything that determines this run's result (its cache key). A FoLoRA run's key holds its whole
        resolved config rather than the knobs that produced it: a changed FoLoRA default is a new run, not a stale
        cache hit, and a run is found again under any spelling of the same config (``{"tau": 1.0}`` and ``{}``
        while 1.0 is the default; a knob entry whose value became the default is the default run)."""
        identity = {"version": SPEC_VERSION, "method": self.method, "lr": float(self.lr), "seed": self.seed,
                    "steps": list(self.steps), "settings": settings.identity()}
        if self.method == "folora":
            resolved = grid_folora_config(settings, self.knobs).to_dict()
            resolved.pop("proxy")  # the grid's shared proxy settings are in "settings"
            for name, before in FOLORA_FIELDS_ADDED.items():  # runs made before the field existed keep their key
                if resolved.get(name) == before:
                    resolved.pop(name)
            identity["folora"] = resolved
        if self.proxy_sequences is not None:  # absent by default, so runs made before it existed keep their key
            identity["proxy_sequences"] = self.proxy_sequences
        return identity

    def slug(self, settings: GridSettings) -> str:
        """The run's folder name: ``<label>_lr<lr>_seed<seed>_<10 hex digits of the identity's SHA-256>``."""
        digest = hashlib.sha256(json.dumps(self.identity(settings), sort_keys=True).encode()).hexdigest()[:10]
        label = re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")
        return f"{label}_lr{self.lr:g}_seed{self.seed}_{digest}"


@dataclass(frozen=True)
class BestLearningRate:
    """A spec entry with ``"lrs": "best"``: its runs use the learning rate with the least mean KL among those where
    the finished runs with the same label reached ≥ 95% of their highest mean target accuracy (``resolve``) —
    "every method at its best learning rate" without editing the spec once the first seed has run."""

    label: str
    method: str
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    knobs: Mapping[str, Any] = field(default_factory=dict)
    proxy_sequences: int | None = None

    def resolve(self, rows: Sequence[Mapping[str, Any]]) -> float | None:
        """The best learning rate among ``rows`` of this label at their last step (None while none has finished).

        Best = the least mean KL among the rates whose mean accuracy is within ``BEST_ACCURACY_SHARE`` (95%) of the
        most accurate rate's: one or two test items of accuracy are noise, so a rate that is a point more accurate
        but forgets three times as much is not the method's best (the same 95% that defines "equal accuracy" in
        the comparison). Only the sweep's seeds decide (rows of this entry's own seeds are left out when others
        exist), so the choice does not move once the entry's seeds have run.
        """
        mine = [row for row in rows if row["label"] == self.label and row["method"] == self.method]
        sweep = [row for row in mine if row["seed"] not in self.seeds]
        mine = sweep or mine
        if not mine:
            return None
        last = max(row["steps"] for row in mine)
        by_lr: dict[float, list[Mapping[str, Any]]] = {}
        for row in mine:
            if row["steps"] == last:
                by_lr.setdefault(row["lr"], []).append(row)
        accuracy = {lr: sum(r["target_accuracy"] for r in runs) / len(runs) for lr, runs in by_lr.items()}
        kl = {lr: sum(r["kl_per_token"] for r in runs) / len(runs) for lr, runs in by_lr.items()}
        top = max(accuracy.values())
        near_top = [lr for lr in by_lr if accuracy[lr] >= BEST_ACCURACY_SHARE * top - 1e-12]  # exactly 95% counts
        return min(near_top, key=lambda lr: (kl[lr], -accuracy[lr], lr))

    def runs(self, lr: float) -> list[GridRun]:
        """This entry's runs (one per seed) at learning rate ``lr``."""
        return [GridRun(label=self.label, method=self.method, lr=lr, seed=seed, steps=self.steps, knobs=self.knobs,
                        proxy_sequences=self.proxy_sequences) for seed in self.seeds]


@dataclass(frozen=True)
class GridSpec:
    """A loaded spec. ``figures`` maps a label to the accuracy-vs-forgetting figure it is drawn in (entries with
    ``"figure": NAME``; the rest go to the main one, ``report.MAIN_FIGURE``), so a knob study does not crowd the
    comparison of methods."""

    settings: GridSettings
    runs: tuple[GridRun, ...]
    best: tuple[BestLearningRate, ...] = ()
    figures: Mapping[str, str] = field(default_factory=dict)


FOLORA_FIELDS_ADDED = {"eigensolver": "full", "statistics_flops_share": None, "statistics_flop_cost": None,
                       "top_k_residual": 1e-3}
"""FoLoRA config fields added after grids had run, with the value that does what every run did before them: a run's
key leaves such a field out at that value, so adding a field invalidates no finished run (a changed default of an
older field still does)."""

SHIPPED_PREFIX = "shipped:"
"""A data path ``"shipped:<name>"`` in a spec is the package's ``data_files/<name>``: the shipped grids name the
shipped data wherever the package is installed."""
_PATH_SETTINGS = (("data",), ("evaluation", "test_data"), ("evaluation", "questions"),
                  ("evaluation", "legacy_questions"), ("proxy", "prompts_path"))


def shipped_paths(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (a spec's raw ``"settings"``) with every ``"shipped:<name>"`` path resolved.

    Raises:
        FileNotFoundError: no shipped data file of that name (the shipped ones are listed).
    """
    def resolve(keys: tuple[str, ...], value: str) -> str:
        if not value.startswith(SHIPPED_PREFIX):
            return value
        path = DATA_FILES_DIR / value[len(SHIPPED_PREFIX):]
        if not path.is_file():
            shipped = ", ".join(sorted(p.name for p in DATA_FILES_DIR.glob("*.jsonl")))
            raise FileNotFoundError(f"grid settings: {'.'.join(keys)}={value!r} names no shipped data file "
                                    f"(shipped: {shipped})")
        return str(path)

    return _map_paths(settings, resolve)


def portable_paths(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (a settings dict) with every path to a shipped data file written ``"shipped:<name>"`` again:
    the inverse of ``shipped_paths``, for what enters run keys and records (they must not hold the install path)."""
    return _map_paths(settings, lambda keys, value: SHIPPED_PREFIX + Path(value).name
                      if Path(value).parent == DATA_FILES_DIR else value)


def _map_paths(settings: Mapping[str, Any], rewrite: Callable[[tuple[str, ...], str], str]) -> dict[str, Any]:
    """A copy of ``settings`` with each data path (``_PATH_SETTINGS``) that is a string replaced by
    ``rewrite(keys, value)``."""
    mapped = json.loads(json.dumps(settings))
    for keys in _PATH_SETTINGS:
        holder = mapped
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder.get(key), dict) else {}
        if isinstance(holder.get(keys[-1]), str):
            holder[keys[-1]] = rewrite(keys, holder[keys[-1]])
    return mapped


def load_spec(source: str | Path | Mapping[str, Any]) -> GridSpec:
    """A grid spec from a JSON file, a shipped grid's name (``folora_ds/toolkit/grids/<name>.json``) or a dict.

    Raises:
        FileNotFoundError: no such file or shipped grid. ValueError: a bad key or value, named with its entry.
    """
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file() and (GRIDS_DIR / f"{source}.json").is_file():
            path = GRIDS_DIR / f"{source}.json"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in GRIDS_DIR.glob("*.json")))
            raise FileNotFoundError(f"grid spec {str(source)!r} does not exist (shipped grids: {shipped})")
        raw = read_json_file(path, what="grid spec")
    unknown = sorted(set(raw) - {"settings", "runs", "description"})
    if unknown or "runs" not in raw:
        raise ValueError(f"grid spec: expected keys settings, runs (and description); got {sorted(raw)}")
    settings = GridSettings.from_dict(shipped_paths(raw.get("settings", {})))
    runs: list[GridRun] = []
    best: list[BestLearningRate] = []
    figures: dict[str, str] = {}
    setups: dict[str, tuple[str, str, int | None]] = {}
    for index, entry in enumerate(raw["runs"]):
        extra = sorted(set(entry) - {"label", "method", "lrs", "seeds", "steps", "knobs", "proxy_sequences",
                                     "figure"})
        if extra or not {"method", "lrs", "seeds", "steps"} <= set(entry):
            raise ValueError(f"grid spec runs[{index}]: expected method, lrs, seeds, steps (label, knobs, "
                             f"proxy_sequences, figure optional); got {sorted(entry)}")
        proxy_sequences = entry.get("proxy_sequences")
        if entry["method"] == "folora" and is_integer(proxy_sequences) and (
                proxy_sequences >= settings.proxy.num_sequences):
            raise ValueError(f"grid spec runs[{index}]: proxy_sequences={proxy_sequences} is not fewer than the "
                             f"shared proxy set's {settings.proxy.num_sequences} sequences "
                             "(settings.proxy.num_sequences); leave it out to use the whole set")
        label = entry.get("label", entry["method"])
        setup = (entry["method"], json.dumps(entry.get("knobs", {}), sort_keys=True), proxy_sequences)
        if setups.setdefault(label, setup) != setup:
            raise ValueError(f"grid spec runs[{index}]: label {label!r} is used by an earlier entry with another "
                             "method, knobs or proxy_sequences; a label is one setup (its rows are averaged over "
                             "seeds), so give this entry its own label")
        figure = entry.get("figure", MAIN_FIGURE)
        if not (isinstance(figure, str) and re.fullmatch(r"[a-z0-9_-]+", figure)):
            raise ValueError(f"grid spec runs[{index}]: figure={figure!r} must be a name of lower-case letters, "
                             "digits, _ or - (it names a PNG)")
        if figure != MAIN_FIGURE and (entry["method"] == PLAIN_LABEL_METHOD or label == REFERENCE_LABEL):
            raise ValueError(f"grid spec runs[{index}]: {label!r} is the reference drawn in every figure; it takes "
                             "no \"figure\"")
        if figures.setdefault(label, figure) != figure:
            raise ValueError(f"grid spec runs[{index}]: label {label!r} is drawn in figure {figures[label]!r} by an "
                             f"earlier entry, not {figure!r} (every entry of a label names the same figure)")
        if not isinstance(entry["seeds"], (list, tuple)) or not entry["seeds"]:
            raise ValueError(f"grid spec runs[{index}]: seeds={entry['seeds']!r} must be a list of seeds")
        if entry["lrs"] == "best":
            best.append(BestLearningRate(label=label, method=entry["method"], seeds=tuple(entry["seeds"]),
                                         steps=tuple(entry["steps"]), knobs=entry.get("knobs", {}),
                                         proxy_sequences=proxy_sequences))
            for seed in entry["seeds"]:  # a concrete entry's checks, now
                GridRun(label=label, method=entry["method"], lr=1.0, seed=seed, steps=tuple(entry["steps"]),
                        knobs=entry.get("knobs", {}), proxy_sequences=proxy_sequences)
            continue
        if not isinstance(entry["lrs"], (list, tuple)) or not entry["lrs"]:
            raise ValueError(f"grid spec runs[{index}]: lrs must be a list of learning rates or \"best\"")
        for lr in entry["lrs"]:
            for seed in entry["seeds"]:
                runs.append(GridRun(label=label, method=entry["method"], lr=lr, seed=seed,
                                    steps=tuple(entry["steps"]), knobs=entry.get("knobs", {}),
                                    proxy_sequences=proxy_sequences))
    for entry in best:
        if not any(run.label == entry.label and run.method == entry.method for run in runs):
            raise ValueError(f"grid spec: \"lrs\": \"best\" for {entry.label!r} needs entries with the same label "
                             "and method and explicit learning rates to choose from")
    slugs = [run.slug(settings) for run in runs]
    duplicate = next((s for s in slugs if slugs.count(s) > 1), None)
    if duplicate is not None:
        raise ValueError(f"grid spec: the run {duplicate} appears twice")
    return GridSpec(settings, tuple(runs), tuple(best), figures)


def grid_folora_config(settings: GridSettings, knobs: Mapping[str, Any] = {}, *,
                       proxy_path: Path | None = None) -> FoLoRAConfig:
    """FoLoRA's config in a grid: the adapter shape and ``max_seq_len`` of ``settings``, ``knobs`` on top, the
    grid's proxy settings (reading the shared set at ``proxy_path``). What a FoLoRA run trains with and is keyed by."""
    return FoLoRAConfig.from_dict({
        "lora_rank": settings.lora_rank, "lora_alpha": settings.lora_alpha,
        "target_modules": list(settings.target_modules) if isinstance(settings.target_modules, tuple)
        else settings.target_modules, "max_seq_len": settings.max_seq_len, **dict(knobs),
        "proxy": {**asdict(settings.proxy), "path": None if proxy_path is None else str(proxy_path)}})


def resolved_settings(run: GridRun, settings: GridSettings) -> dict[str, Any]:
    """Every setting the run used, defaults included (its key holds only the non-default ones, so a field added
    later does not invalidate finished runs; this record catches a *changed* default instead)."""
    resolved = {"settings": portable_paths(settings.to_dict()), "files": data_fingerprints(settings)}
    if run.method == "folora":
        resolved["folora"] = FoLoRAConfig.from_dict(dict(run.knobs)).to_dict()
    if run.proxy_sequences is not None:
        resolved["proxy_sequences"] = run.proxy_sequences
    return json.loads(json.dumps(resolved))


def data_fingerprints(settings: GridSettings) -> dict[str, str]:
    """A content hash (16 hex digits) of each data file the grid reads (task data, test split, retention
    questions, the proxy's prompts): the settings name them by path, so an edited file would otherwise reuse
    results measured on the old content. A directory (a saved ``datasets`` folder) is hashed over its files'
    relative names and bytes."""
    paths = {"data": settings.data, "test_data": settings.evaluation.test_data,
             "questions": settings.evaluation.questions}
    if settings.evaluation.legacy_questions is not None:  # absent without it: older grids keep their record
        paths["legacy_questions"] = settings.evaluation.legacy_questions
    if settings.proxy.prompts_path is not None:  # the same: only grids with a prompts file record one
        paths["proxy_prompts"] = settings.proxy.prompts_path
    fingerprints = {}
    for name, path in paths.items():
        digest = hashlib.sha256()
        target = Path(path)
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for file in files:
            digest.update(str(file.relative_to(target) if target.is_dir() else file.name).encode())
            digest.update(file.read_bytes())
        fingerprints[name] = digest.hexdigest()[:16]
    return fingerprints


def changed_settings(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """The settings (dotted names) whose recorded value differs from the current one (settings added since are not
    changes)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [name for key, value in recorded.items()
                for name in (changed_settings(value, current[key], f"{prefix}{key}.") if key in current
                             else [f"{prefix}{key}"])]
    return [] if recorded == current else [prefix.rstrip(".")]


def _non_default(instance: Any) -> dict[str, Any]:
    """The fields of dataclass ``instance`` that differ from their defaults, nested dataclasses recursively
    (tuples as lists, as JSON writes them)."""
    result = {}
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        if dataclasses.is_dataclass(value):
            nested = _non_default(value)
            if nested:
                result[item.name] = nested
            continue
        default = item.default if item.default is not dataclasses.MISSING else (
            item.default_factory() if item.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if value != default:
            result[item.name] = list(value) if isinstance(value, tuple) else value
    return result
