"""The comparison grid: methods × learning rates × seeds × steps, trained and measured the same way, cached, resumable.

A grid is a JSON spec (``folora_ds/grids/*.json``)::

    {"settings": {"model": "smollm2-135m-instruct", "batch_size": 8, ...},        # GridSettings, shared by all runs
     "runs": [{"label": "plain LoRA", "method": "lora", "lrs": [1e-4, 2e-4], "seeds": [0, 1, 2],
               "steps": [30, 60]},
              {"label": "FoLoRA", "method": "folora", "lrs": [4e-4], "seeds": [0, 1, 2], "steps": [60],
               "knobs": {"tau": 1.0}}]}

Every (entry, lr, seed) is one training run through the product's own path: ``folora_ds.initialize`` and
``GatedAdamW`` for FoLoRA, ``deepspeed.initialize`` with torch AdamW for the others (``folora_ds.methods``), a
DeepSpeed world of one, the same batches in the same order for every method with the same seed. It saves an adapter
at each of its ``steps`` and measures each (``folora_ds.evaluation``) plus the forgetting proxies on C_pre.

What is computed once and reused (``<output>/shared/``): the proxy set the model samples, C_pre, C_task of each
seed's calibration batches (for the covariance baselines and the forgetting proxies) and the base model's
evaluation. A run's folder (``<output>/runs/<slug>/``) is complete when every step's ``evaluation.json`` exists;
its name holds a hash of everything that determines it, so a changed setting is a new run and a finished run is
never redone. Interrupt at any time and start again: training restarts only for the run that was cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from folora_ds.config import FoLoRAConfig, ProxyConfig
from folora_ds.data import DEFAULT_TASK_FILE
from folora_ds.evaluation import EvaluationSettings
from folora_ds.methods import COVARIANCE_INITS, check_method
from folora_ds.report import MAIN_FIGURE, PLAIN_LABEL_METHOD, REFERENCE_LABEL

GRIDS_DIR = Path(__file__).parent / "grids"
SPEC_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class GridSettings:
    """What every run of a grid shares.

    Attributes:
        model: "smollm2-135m-instruct", "tiny-llama" or a local Hugging Face model directory.
        data: task training data (prompt/response or messages JSONL, or a saved ``datasets`` directory).
        batch_size: examples per optimizer step (one micro-batch).
        calibration_steps: the first steps' batches give the initial C_task (FoLoRA and the covariance baselines).
        lora_rank, lora_alpha, target_modules: the adapter of every method.
        proxy: how the proxy set is sampled from the model (once per grid), as FoLoRA's ``proxy`` block.
        evaluation: what each checkpoint is measured on (``folora_ds.evaluation.EvaluationSettings``).
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
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"grid settings: {name}={value!r} must be an integer >= 1")
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
        setting added later with a default does not invalidate finished runs."""
        return _non_default(self)


BEST_ACCURACY_SHARE = 0.95  # "lrs": "best" = least KL among the rates at ≥ 95% of the top accuracy


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
        check_method(self.method)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"run {self.label!r}: lr={self.lr!r} must be a positive number")
        steps = tuple(self.steps)
        if not steps or any(not isinstance(s, int) or s < 1 for s in steps) or len(set(steps)) != len(steps):
            raise ValueError(f"run {self.label!r}: steps={self.steps!r} must be distinct integers >= 1")
        object.__setattr__(self, "steps", tuple(sorted(steps)))
        if self.knobs and self.method != "folora":
            raise ValueError(f"run {self.label!r}: knobs are FoLoRA settings; method {self.method!r} takes none")
        if self.method == "folora":
            FoLoRAConfig.from_dict(dict(self.knobs))  # a typo or bad value is named before any work
        if self.proxy_sequences is not None:
            if self.method != "folora":
                raise ValueError(f"run {self.label!r}: proxy_sequences is a FoLoRA setting; method {self.method!r} "
                                 "takes none")
            if not (isinstance(self.proxy_sequences, int) and not isinstance(self.proxy_sequences, bool)
                    and self.proxy_sequences >= 1):
                raise ValueError(f"run {self.label!r}: proxy_sequences={self.proxy_sequences!r} must be an integer "
                                 ">= 1")

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
            identity["folora"] = resolved
        if self.proxy_sequences is not None:  # absent by default, so runs made before it existed keep their key
            identity["proxy_sequences"] = self.proxy_sequences
        return identity

    def slug(self, settings: GridSettings) -> str:
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


def load_spec(source: str | Path | Mapping[str, Any]) -> GridSpec:
    """A grid spec from a JSON file, a shipped grid's name (``folora_ds/grids/<name>.json``) or a dict.

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
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"grid spec {str(path)!r}: not valid JSON (line {error.lineno}: {error.msg})") from error
    unknown = sorted(set(raw) - {"settings", "runs", "description"})
    if unknown or "runs" not in raw:
        raise ValueError(f"grid spec: expected keys settings, runs (and description); got {sorted(raw)}")
    settings = GridSettings.from_dict(raw.get("settings", {}))
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
        if entry["method"] == "folora" and type(proxy_sequences) is int and (
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
        if entry["lrs"] == "best":
            best.append(BestLearningRate(label=label, method=entry["method"], seeds=tuple(entry["seeds"]),
                                         steps=tuple(entry["steps"]), knobs=entry.get("knobs", {}),
                                         proxy_sequences=proxy_sequences))
            GridRun(label=label, method=entry["method"], lr=1.0, seed=0, steps=tuple(entry["steps"]),
                    knobs=entry.get("knobs", {}), proxy_sequences=proxy_sequences)  # a concrete entry's checks, now
            continue
        if isinstance(entry["lrs"], str) or not entry["lrs"]:
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


def _non_default(instance) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------- shared artefacts
class SharedArtifacts:
    """The per-grid artefacts computed once: proxy set, C_pre, per-seed C_task, base evaluation."""

    def __init__(self, settings: GridSettings, directory: Path, *, progress: bool) -> None:
        from folora_ds.outputs import write_json

        self.settings, self.directory, self.progress = settings, directory, progress
        directory.mkdir(parents=True, exist_ok=True)
        recorded = directory / "settings.json"
        current = {**settings.identity(), "files": data_fingerprints(settings)}
        if recorded.is_file():
            before = json.loads(recorded.read_text())
            if "files" not in before:  # recorded before data fingerprints were
                current.pop("files")
            if before != current:
                changed = sorted(set(before) ^ set(current) | {
                    key for key in before if before.get(key) != current.get(key)})
                raise ValueError(f"{directory.parent} holds a grid with other shared settings or data "
                                 f"({', '.join(changed)} differ): its proxy set, statistics and base evaluation would "
                                 "not match; use another --output")
        else:
            write_json(recorded, current)
        self._base = None
        self._statistics: dict[int, dict[str, Any]] = {}
        from folora_ds.evaluation import BaseLogitsCache

        self.base_logits = BaseLogitsCache()  # the base's held-out logits, computed at the first evaluation

    @property
    def proxy_path(self) -> Path:
        return self.directory / "proxy.jsonl"

    def folora_config(self, knobs: Mapping[str, Any] = {}) -> FoLoRAConfig:
        """FoLoRA's config of this grid (its adapter, the shared proxy set) with ``knobs`` on top."""
        return grid_folora_config(self.settings, knobs, proxy_path=self.proxy_path)

    def _computed_once(self, name: str):
        """The claim under which one of several workers sharing this folder computes the artefact ``name``; the
        others wait for it and then find the file (callers check again inside)."""
        from folora_ds.outputs import claimed

        return claimed(self.directory / f".{name}.lock", wait=True)

    def ensure_proxy(self) -> None:
        """Sample the proxy set from the base model once (``proxy.jsonl``, written complete or not at all)."""
        if self.proxy_path.is_file():
            return
        with self._computed_once("proxy"):
            if not self.proxy_path.is_file():
                self._sample_proxy()

    def _sample_proxy(self) -> None:
        from folora_ds.models import load_model
        from folora_ds.proxy import sample_proxy, save_proxy_jsonl

        started = time.perf_counter()
        _phase(f"sampling the proxy set: {self.settings.proxy.num_sequences} sequences of "
               f"{self.settings.proxy.seq_len} tokens from {self.settings.model}")
        model, tokenizer = load_model(self.settings.model)
        samples = sample_proxy(model, tokenizer, self.settings.proxy, progress=self.progress)
        save_proxy_jsonl(samples, self.proxy_path, self.settings.proxy)
        _phase(f"proxy set ready in {time.perf_counter() - started:.0f} s")

    def base(self):
        """The untouched base model and tokenizer used for every evaluation (loaded once)."""
        if self._base is None:
            from folora_ds.models import load_model

            self._base = load_model(self.settings.model)
        return self._base

    def base_evaluation(self) -> dict[str, Any]:
        """The base model's measures (``shared/base_evaluation.json``, measured once)."""
        from folora_ds.evaluation import measure_base
        from folora_ds.outputs import write_json

        path = self.directory / "base_evaluation.json"
        if not path.is_file():
            with self._computed_once("base_evaluation"):
                if not path.is_file():
                    _phase("measuring the base model")
                    model, tokenizer = self.base()
                    write_json(path, measure_base(model, tokenizer, self.suite(), progress=self.progress))
        return json.loads(path.read_text())

    def suite(self):
        from folora_ds.evaluation import EvaluationSuite

        if not hasattr(self, "_suite"):
            self._suite = EvaluationSuite.load(self.settings.evaluation)
        return self._suite

    def statistics(self, seed: int) -> dict[str, Any]:
        """``{"members": key → module names, "pre": key → C_pre, "task": key → C_task}`` of ``seed``'s calibration
        batches (``shared/statistics_seed<seed>.pt``; C_pre is the same for every seed, stored once)."""
        if seed in self._statistics:
            return self._statistics[seed]
        pre_path, task_path = self.directory / "statistics_pre.pt", self.directory / f"statistics_seed{seed}.pt"
        if not (pre_path.is_file() and task_path.is_file()):
            with self._computed_once(f"statistics_seed{seed}"):
                if not (pre_path.is_file() and task_path.is_file()):
                    self._compute_statistics(seed, pre_path, task_path)
        pre, task = torch.load(pre_path, weights_only=True), torch.load(task_path, weights_only=True)
        self._statistics = {seed: {"members": pre["members"], "pre": pre["covariances"],
                                   "task": task["covariances"]}}  # one seed held at a time (~0.8 GB for SmolLM2)
        return self._statistics[seed]

    def module_covariances(self, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name → (C_pre, C_task) of ``seed``."""
        stats = self.statistics(seed)
        return {name: (stats["pre"][key], stats["task"][key]) for key, names in stats["members"].items()
                for name in names}

    def _compute_statistics(self, seed: int, pre_path: Path, task_path: Path) -> None:
        from peft import get_peft_model

        from folora_ds.controller import FoLoRAController
        from folora_ds.engine import calibration_batches
        from folora_ds.outputs import replace_atomically
        from folora_ds.proxy import load_proxy_jsonl

        _phase(f"collecting C_pre and C_task (seed {seed}) for the covariance baselines and forgetting measures")
        # C_task over every real token, whatever FoLoRA's default: SC-LoRA's published init covers its task data
        # whole, and a grid folder's cached statistics must not change meaning with a FoLoRA default
        folora = self.folora_config({"statistics_tokens": None, "task_token_mask": "attention"})
        data = TrainingData(self.settings, seed, steps=self.settings.calibration_steps)
        model = get_peft_model(data.model, data.lora_config("lora"))
        controller = FoLoRAController(model, folora)
        samples = load_proxy_jsonl(self.proxy_path, tokenizer=data.tokenizer, max_length=folora.max_seq_len)
        controller.calibrate(calibration_batches(samples, data.tokenizer, folora), data.calibration_batches(),
                             progress=self.progress)
        members = controller.collector.members()
        for path, covariances in ((pre_path, controller.pre_covariances),
                                  (task_path, {key: controller.task_ema[key] for key in members})):
            if path == pre_path and path.is_file():
                continue
            with replace_atomically(path) as scratch:
                torch.save({"members": members, "covariances": {k: v.float().cpu() for k, v in covariances.items()}},
                           scratch)
        controller.remove()


def grid_folora_config(settings: GridSettings, knobs: Mapping[str, Any] = {}, *,
                       proxy_path: Path | None = None) -> FoLoRAConfig:
    """FoLoRA's config in a grid: the adapter shape and ``max_seq_len`` of ``settings``, ``knobs`` on top, the
    grid's proxy settings (reading the shared set at ``proxy_path``). What a FoLoRA run trains with and is keyed by."""
    return FoLoRAConfig.from_dict({
        "lora_rank": settings.lora_rank, "lora_alpha": settings.lora_alpha,
        "target_modules": list(settings.target_modules) if isinstance(settings.target_modules, tuple)
        else settings.target_modules, "max_seq_len": settings.max_seq_len, **dict(knobs),
        "proxy": {**asdict(settings.proxy), "path": None if proxy_path is None else str(proxy_path)}})


# ---------------------------------------------------------------------------------------------- one run
class TrainingData:
    """A fresh base model (seeded) with the grid's tokenized task data, split and batch order for ``seed``: the
    same for every method with the same seed."""

    def __init__(self, settings: GridSettings, seed: int, *, steps: int) -> None:
        from folora_ds.data import TaskCollator, build_task_dataset, split_train_eval
        from folora_ds.models import load_model
        from folora_ds.run import batch_order

        self.settings, self.seed = settings, seed
        self.model, self.tokenizer = load_model(settings.model, seed=seed)
        dataset = build_task_dataset(settings.data, self.tokenizer, max_length=settings.max_seq_len)
        self.train_set, _ = split_train_eval(dataset, eval_fraction=0.1, seed=seed)
        self.collate = TaskCollator(pad_token_id=self.tokenizer.pad_token_id)
        self.order = batch_order(len(self.train_set), settings.batch_size, steps, seed)
        torch.manual_seed(seed)  # the LoRA init drawn next is the same for every method with this seed

    def lora_config(self, method: str):
        from folora_ds.methods import lora_config

        settings = self.settings
        return lora_config(method, rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=0.0,
                           targets=settings.target_modules)

    def batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        yield self.collate([self.train_set[i] for i in self.order[step]])

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        return [batch for step in range(min(self.settings.calibration_steps, len(self.order)))
                for batch in self.batches(step)]


def _ds_config(settings: GridSettings, lr: float) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"lr": lr,
                                                                                         "weight_decay": 0.0}}}


def train_run(run: GridRun, shared: SharedArtifacts, directory: Path, *, progress: bool) -> dict[str, Any]:
    """Train ``run``, saving ``step<N>/adapter`` at each of its steps; returns what ``train.json`` records."""
    import deepspeed

    from folora_ds.distributed import comm
    from folora_ds.ds_config import prepare_ds_config
    from folora_ds.methods import MUTATING_INITS, build_peft_model, save_initial_adapter, save_trained_adapter
    from folora_ds.proxy import load_proxy_jsonl
    from folora_ds.run import _train

    started = time.perf_counter()
    settings = shared.settings
    data = TrainingData(settings, run.seed, steps=max(run.steps))
    folora = shared.folora_config(run.knobs)
    record: dict[str, Any] = {"run": run.identity(settings) | {"label": run.label},
                              "resolved": resolved_settings(run, settings)}
    samples = load_proxy_jsonl(shared.proxy_path, tokenizer=data.tokenizer, max_length=folora.max_seq_len)
    if run.proxy_sequences is not None:
        if run.proxy_sequences > len(samples):
            raise ValueError(f"run {run.label!r}: proxy_sequences={run.proxy_sequences} exceeds the shared proxy "
                             f"set's {len(samples)} sequences ({shared.proxy_path})")
        samples = samples[:run.proxy_sequences]
    record["proxy_sequences"] = len(samples)  # the proxy set FoLoRA calibrates on (CorDA: its knowledge data)
    if run.method == "folora":
        from peft import get_peft_model

        from folora_ds.engine import calibration_batches, initialize

        model = get_peft_model(data.model, data.lora_config("lora"))
        prepared = prepare_ds_config({**_ds_config(settings, run.lr), "folora": folora.to_dict()})
        engine, controller = initialize(model, prepared, proxy_batches=calibration_batches(samples, data.tokenizer,
                                                                                            folora),
                                        task_batches=data.calibration_batches(), progress=progress)
    else:
        covariances = shared.module_covariances(run.seed) if run.method in COVARIANCE_INITS else None
        torch.manual_seed(run.seed)
        model = build_peft_model(data.model, run.method, data.lora_config(run.method),
                                 knowledge_sequences=[s.token_ids for s in samples], covariances=covariances,
                                 sc_lora_beta=settings.sc_lora_beta)
        initial = directory / "initial_adapter"
        if run.method in MUTATING_INITS:
            save_initial_adapter(model, run.method, initial)
        prepared = prepare_ds_config({**_ds_config(settings, run.lr), "folora": {}})
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      **prepared.optimizer_arguments)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=prepared.ds_config)
        controller = None
    record["setup_seconds"] = time.perf_counter() - started
    losses: list[float] = []
    done = 0
    for checkpoint in run.steps:
        losses += _train(engine, lambda step, offset=done: data.batches(step + offset), checkpoint - done,
                         controller=controller, description=f"{run.label} lr {run.lr:g} seed {run.seed}",
                         progress=progress)
        done = checkpoint
        target = directory / f"step{checkpoint}" / "adapter"
        if controller is not None:
            controller.check_gating()  # every optimizer step so far went through the gate
            controller.export_adapter(target)
        else:
            save_trained_adapter(model, run.method, target, initial if run.method in MUTATING_INITS else None)
    record["train_losses"] = losses
    if controller is not None:
        record["gated_steps"] = controller.gated_step_counts()
        record["optimizer_steps"] = controller.optimizer_steps
        record["refreshes"] = controller.refreshes
        record["layers"] = [asdict(layer) for layer in controller.layer_summaries()]
        record["tau_scale"] = None if controller.budget is None else controller.budget.tau_scale
        controller.remove()
    engine.destroy()
    del engine, model
    record["train_seconds"] = time.perf_counter() - started
    comm.barrier()
    return record


def evaluate_checkpoint(adapter: Path, shared: SharedArtifacts, seed: int, *, progress: bool) -> dict[str, Any]:
    """Measure one saved adapter on the untouched base model: ``evaluation.measure_adapted`` plus, per LoRA
    module, the forgetting proxy tr(ΔW C_pre ΔWᵀ) and the module's base energy tr(W C_pre Wᵀ)."""
    from peft import PeftModel

    from folora_ds.evaluation import measure_adapted

    base, tokenizer = shared.base()
    base_correct = shared.base_evaluation()["correct"]
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    try:
        result = measure_adapted(model, tokenizer, shared.suite(), base_correct, progress=progress,
                                 base_cache=shared.base_logits)
        result.update(forgetting_proxies(model, shared.module_covariances(seed)))
    finally:
        shared._base = (model.unload(), tokenizer)
    return result


@torch.no_grad()
def forgetting_proxies(peft_model, covariances: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Per LoRA module of ``peft_model``: ``penalty`` tr(ΔW C_pre ΔWᵀ) of the adapter's ΔW and ``base_energy``
    tr(W C_pre Wᵀ), with C_pre from ``covariances`` (module name → (C_pre, C_task), names as peft gives them).

    Raises:
        KeyError: a LoRA module without covariances (another model or target list than the statistics').
    """
    from folora_ds.budget import base_energy
    from folora_ds.peft_utils import active_adapter, base_weight_matrix, lora_layers

    penalty, energy = {}, {}
    for name, layer in lora_layers(peft_model).items():
        if name not in covariances:
            raise KeyError(f"no calibration covariance for LoRA module {name!r}")
        c_pre = covariances[name][0].double()
        delta = layer.get_delta_weight(active_adapter(layer)).double()
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        penalty[name] = float(torch.einsum("oi,ij,oj->", delta, c_pre, delta))
        energy[name] = float(base_energy(base_weight_matrix(layer).double(), c_pre))
    return {"penalty_by_module": penalty, "base_energy_by_module": energy}


# ---------------------------------------------------------------------------------------------- the grid
def run_grid(spec: GridSpec, output_dir: str | Path, *, progress: bool = True,
             only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train and measure every run of ``spec`` not already complete in ``output_dir``; returns every row.

    Args:
        only: run only entries with these labels (the rest are still reported when complete).

    Raises:
        ValueError: more than one process (the grid runs in a DeepSpeed world of one), or a bad spec.
    """
    from folora_ds.distributed import comm
    from folora_ds.outputs import write_json

    output_dir = Path(output_dir)
    started_group = comm.init_distributed()
    try:
        if comm.world_size() != 1:
            raise ValueError("folora-ds grid runs in one process; launch it without deepspeed/torchrun")
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "spec.json", {"settings": spec.settings.to_dict(),
                                              "runs": [run.identity(spec.settings) | {"label": run.label}
                                                       for run in spec.runs]})
        shared = SharedArtifacts(spec.settings, output_dir / "shared", progress=progress)
        shared.ensure_proxy()
        shared.base_evaluation()
        selected = [run for run in spec.runs if only is None or run.label in only]
        best = [entry for entry in spec.best if only is None or entry.label in only]
        todo = [run for run in selected
                if not _complete(run, output_dir / "runs" / run.slug(spec.settings), spec.settings)]
        _phase(f"{len(selected) - len(todo)} of {len(selected)} runs{' selected by --only' if only else ''} already "
               f"complete; {len(todo)} to go"
               + (f" (+ {len(best)} entries at their best learning rate)" if best else ""))
        held_elsewhere: list[GridRun] = []
        waiting = list(best)

        def run_best_entries(final: bool) -> None:
            """Run each "best" entry whose sweep is finished (as soon as it is: its seeds need not wait for
            unrelated entries); at the end, say which could not be decided."""
            for entry in list(waiting):
                unfinished = [run for run in spec.runs if run.label == entry.label
                              and not _complete(run, output_dir / "runs" / run.slug(spec.settings))]
                if unfinished:  # its sweep, or part of it held by another worker, is still running
                    if final:
                        _phase(f"{entry.label}: {len(unfinished)} run(s) of its sweep are not finished; its best "
                               "learning rate is chosen when they are (run the grid again)")
                    continue
                waiting.remove(entry)
                lr = entry.resolve(collect_rows(GridSpec(spec.settings, spec.runs), output_dir))
                if lr is None:
                    _phase(f"{entry.label}: no finished run to choose its best learning rate from; skipped for now")
                    continue
                for run in entry.runs(lr):
                    if not _complete(run, output_dir / "runs" / run.slug(spec.settings), spec.settings):
                        _phase(f"{run.label} at its best lr {lr:g}: seed {run.seed}, steps {list(run.steps)}")
                        if not _run_claimed(run, spec.settings, shared, output_dir, progress):
                            held_elsewhere.append(run)

        run_best_entries(final=False)
        for index, run in enumerate(todo, 1):
            _phase(f"[{index}/{len(todo)}] {run.label}: lr {run.lr:g}, seed {run.seed}, steps {list(run.steps)}")
            if not _run_claimed(run, spec.settings, shared, output_dir, progress):
                held_elsewhere.append(run)
            run_best_entries(final=False)
        run_best_entries(final=True)
        if held_elsewhere:
            _phase(f"{len(held_elsewhere)} run(s) were being trained by another worker on this folder and are not "
                   "in this report yet: " + "; ".join(f"{run.label} lr {run.lr:g} seed {run.seed}"
                                                      for run in held_elsewhere))
        return collect_rows(spec, output_dir)
    finally:
        if started_group:
            comm.shutdown()


def resolved_settings(run: GridRun, settings: GridSettings) -> dict[str, Any]:
    """Every setting the run used, defaults included (its key holds only the non-default ones, so a field added
    later does not invalidate finished runs; this record catches a *changed* default instead)."""
    resolved = {"settings": settings.to_dict(), "files": data_fingerprints(settings)}
    if run.method == "folora":
        resolved["folora"] = FoLoRAConfig.from_dict(dict(run.knobs)).to_dict()
    if run.proxy_sequences is not None:
        resolved["proxy_sequences"] = run.proxy_sequences
    return json.loads(json.dumps(resolved))


def data_fingerprints(settings: GridSettings) -> dict[str, str]:
    """A content hash of each data file the grid reads (task data, test split, retention questions): the settings
    name them by path, so an edited file would otherwise reuse results measured on the old content."""
    paths = {"data": settings.data, "test_data": settings.evaluation.test_data,
             "questions": settings.evaluation.questions}
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
    """The settings whose recorded value differs from the current one (settings added since are not changes)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [name for key, value in recorded.items()
                for name in (changed_settings(value, current[key], f"{prefix}{key}.") if key in current
                             else [f"{prefix}{key}"])]
    return [] if recorded == current else [prefix.rstrip(".")]


def _run_claimed(run: GridRun, settings: GridSettings, shared: SharedArtifacts, output_dir: Path,
                 progress: bool) -> bool:
    """``_run_one`` under the run's claim (``<output>/claims/<slug>.lock``), so several workers can share one grid
    folder: a run another worker holds is left to it (returns False); one it finished while this worker waited
    for its turn is not redone."""
    from folora_ds.outputs import claimed

    slug = run.slug(settings)
    with claimed(output_dir / "claims" / f"{slug}.lock") as held:
        if not held:
            _phase("held by another worker on this folder; moving on")
            return False
        if not _complete(run, output_dir / "runs" / slug, settings):
            _run_one(run, settings, shared, output_dir, progress)
    return True


def _run_one(run: GridRun, settings: GridSettings, shared: SharedArtifacts, output_dir: Path, progress: bool) -> None:
    """Train ``run`` unless its adapters exist (a stale run is removed first), then measure every missing step."""
    import shutil

    from folora_ds.outputs import write_json

    directory = output_dir / "runs" / run.slug(settings)
    train_path = directory / "train.json"
    if train_path.is_file() and changed_settings(json.loads(train_path.read_text()).get("resolved") or {},
                                                 resolved_settings(run, settings)):
        shutil.rmtree(directory)
    if not train_path.is_file() or not all((directory / f"step{s}" / "adapter").is_dir() for s in run.steps):
        record = train_run(run, shared, directory, progress=progress)
        write_json(train_path, record)
        _phase(f"trained in {record['train_seconds']:.0f} s")
    for steps in run.steps:
        path = directory / f"step{steps}" / "evaluation.json"
        if not path.is_file():
            result = evaluate_checkpoint(directory / f"step{steps}" / "adapter", shared, run.seed, progress=progress)
            write_json(path, result)
            _phase(f"step {steps}: target accuracy {result['target_accuracy']:.1%}, retention "
                   f"{result['retention']:.1%}, KL {result['kl_per_token']:.4f} ({result['seconds']:.0f} s)")


def _complete(run: GridRun, directory: Path, settings: GridSettings | None = None) -> bool:
    """Every step's evaluation exists and the run was made with today's resolved settings (a default changed since
    makes it stale: it is trained again)."""
    if not all((directory / f"step{s}" / "evaluation.json").is_file() for s in run.steps):
        return False
    if settings is None:
        return True
    recorded = json.loads((directory / "train.json").read_text()).get("resolved")
    if recorded is None:  # written before resolved settings were recorded
        return True
    changed = changed_settings(recorded, resolved_settings(run, settings))
    if changed:
        _phase(f"{directory.name}: made with another {', '.join(changed[:3])}; training it again")
        return False
    return True


def collect_rows(spec: GridSpec, output_dir: str | Path) -> list[dict[str, Any]]:
    """One row per complete (run, step) of ``spec`` in ``output_dir`` (incomplete runs are left out)."""
    output_dir = Path(output_dir)
    rows = []
    runs = list(spec.runs)
    if spec.best:
        concrete = collect_rows(GridSpec(spec.settings, spec.runs), output_dir)
        for entry in spec.best:
            lr = entry.resolve(concrete)
            runs += [] if lr is None else [run for run in entry.runs(lr)
                                           if run.slug(spec.settings) not in {r.slug(spec.settings) for r in runs}]
    for run in runs:
        directory = output_dir / "runs" / run.slug(spec.settings)
        try:
            if not _complete(run, directory, spec.settings):
                continue
            train = json.loads((directory / "train.json").read_text())
            results = {steps: json.loads((directory / f"step{steps}" / "evaluation.json").read_text())
                       for steps in run.steps}
        except FileNotFoundError:  # another worker on this folder is removing it as stale: not complete
            continue
        for steps, result in results.items():
            penalty, energy = result["penalty_by_module"], result["base_energy_by_module"]
            rows.append({
                "label": run.label, "method": run.method, "lr": run.lr, "seed": run.seed, "steps": steps,
                "knobs": json.dumps(dict(run.knobs), sort_keys=True), "target_accuracy": result["target_accuracy"],
                "questions_correct": result["questions_correct"], "retention": result["retention"],
                "kl_per_token": result["kl_per_token"], "base_perplexity": result["base_perplexity"],
                "adapted_perplexity": result["adapted_perplexity"],
                "penalty_total": sum(penalty.values()),
                "penalty_relative_total": sum(penalty.values()) / sum(energy.values()),
                "penalty_relative_mean": sum(penalty[n] / energy[n] for n in penalty) / len(penalty),
                "train_seconds": train["train_seconds"], "eval_seconds": result["seconds"],
                "proxy_sequences": run.proxy_sequences, "slug": directory.name})
    return rows


def lost_questions(spec: GridSpec, output_dir: str | Path, *, labels: Sequence[str] | None = None,
                   progress: bool = True) -> str:
    """Which base-correct retention questions each finished run lost at its last step, and how: every run's
    adapter (optionally only ``labels``) answers the questions again, greedily as in the evaluation. Writes and
    returns ``lost_questions.md`` (``report.lost_questions_markdown``). Answers are not part of the cached
    evaluation, so this reruns generation (~15 s per run for SmolLM2 on 2 cores).

    Raises:
        ValueError: no finished run (of ``labels``) in ``output_dir`` — checked before any model is loaded.
    """
    from peft import PeftModel

    from folora_ds.evaluation import answer_is_correct, greedy_answers
    from folora_ds.outputs import replace_atomically
    from folora_ds.report import lost_questions_markdown

    output_dir = Path(output_dir)
    last: dict[str, dict[str, Any]] = {}
    for row in collect_rows(spec, output_dir):
        if (labels is None or row["label"] in labels) and row["steps"] > last.get(row["slug"], {"steps": -1})["steps"]:
            last[row["slug"]] = row
    if not last:
        raise ValueError(f"no finished run{' of ' + ', '.join(map(repr, labels)) if labels else ''} in "
                         f"{str(output_dir)!r}")
    shared = SharedArtifacts(spec.settings, output_dir / "shared", progress=progress)
    suite = shared.suite()
    questions = list(suite.questions)
    base, tokenizer = shared.base()
    answered = []
    for row in sorted(last.values(), key=lambda r: (r["label"], r["lr"], r["seed"])):
        adapter = output_dir / "runs" / row["slug"] / f"step{row['steps']}" / "adapter"
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        try:
            answers = greedy_answers(model, tokenizer, [q.prompt for q in questions],
                                     max_new_tokens=suite.settings.max_new_tokens,
                                     batch_size=suite.settings.batch_size, progress=progress,
                                     description=f"{row['label']} lr {row['lr']:g} s{row['seed']}")
        finally:
            base = model.unload()
        answered.append((row, answers, [answer_is_correct(a, q.answers) for a, q in zip(answers, questions)]))
    text = lost_questions_markdown(questions, shared.base_evaluation()["correct"], answered)
    with replace_atomically(output_dir / "lost_questions.md") as scratch:
        scratch.write_text(text)
    return text


def _phase(message: str) -> None:
    print(f"[grid] {message}", flush=True)
