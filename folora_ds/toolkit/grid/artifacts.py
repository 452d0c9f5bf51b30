"""What the runs of a grid share: the artefacts computed once per grid folder, and each seed's training data.

``SharedArtifacts`` owns ``<output>/shared/``: the proxy set the model samples, C_pre, C_task of each seed's
calibration batches (for the covariance baselines and the forgetting proxies) and the base model's evaluation.
Each is computed once, under a claim, so several workers sharing one grid folder compute it once between them; the
folder refuses a grid with other shared settings or data (``settings.json``).

``TrainingData`` is a seed's fresh base model, tokenized task data, split and batch order: the same for every
method with the same seed, so methods differ only in what they do with the batches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from folora_ds.common.files import claimed, read_json_file, replace_atomically, write_json
from folora_ds.controller import FoLoRAController
from folora_ds.controller.proxy import calibration_batches, load_proxy_jsonl, sample_proxy, save_proxy_jsonl
from folora_ds.method.config import FoLoRAConfig
from folora_ds.toolkit.evaluation import EvaluationSuite, measure_base
from folora_ds.toolkit.grid.spec import GridSettings, data_fingerprints, grid_folora_config
from folora_ds.toolkit.measures import BaseLogitsCache
from folora_ds.toolkit.methods import lora_config
from folora_ds.training.data import TaskCollator, build_task_dataset, split_train_eval
from folora_ds.training.models import load_model
from folora_ds.training.run import batch_order

_log = logging.getLogger(__name__)


class SharedArtifacts:
    """The per-grid artefacts computed once: proxy set, C_pre, per-seed C_task, base evaluation; and the base
    model every checkpoint is measured on (loaded once, adapters put on and taken off it: ``adapted``).

    Raises (constructor):
        ValueError: ``directory`` holds the artefacts of a grid with other shared settings or data files.
    """

    def __init__(self, settings: GridSettings, directory: Path, *, progress: bool) -> None:
        self.settings, self.directory, self.progress = settings, directory, progress
        directory.mkdir(parents=True, exist_ok=True)
        recorded = directory / "settings.json"
        current = {**settings.identity(), "files": data_fingerprints(settings)}
        if recorded.is_file():
            before = read_json_file(recorded, what="grid shared settings")
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
        self._base: tuple[Any, Any] | None = None
        self._suite: EvaluationSuite | None = None
        self._statistics: dict[int, dict[str, Any]] = {}
        self.base_logits = BaseLogitsCache()  # the base's held-out logits, computed at the first evaluation

    @property
    def proxy_path(self) -> Path:
        return self.directory / "proxy.jsonl"

    def folora_config(self, knobs: Mapping[str, Any] = {}) -> FoLoRAConfig:
        """FoLoRA's config of this grid (its adapter, the shared proxy set) with ``knobs`` on top."""
        return grid_folora_config(self.settings, knobs, proxy_path=self.proxy_path)

    def _computed_once(self, name: str) -> contextlib.AbstractContextManager[bool]:
        """The claim under which one of several workers sharing this folder computes the artefact ``name``; the
        others wait for it and then find the file (callers check again inside)."""
        return claimed(self.directory / f".{name}.lock", wait=True)

    def ensure_proxy(self) -> None:
        """Sample the proxy set from the base model once (``proxy.jsonl``, written complete or not at all)."""
        if self.proxy_path.is_file():
            return
        with self._computed_once("proxy"):
            if not self.proxy_path.is_file():
                self._sample_proxy()

    def _sample_proxy(self) -> None:
        started = time.perf_counter()
        _log.info("sampling the proxy set: %d sequences of %d tokens from %s", self.settings.proxy.num_sequences,
                  self.settings.proxy.seq_len, self.settings.model)
        model, tokenizer = load_model(self.settings.model)
        samples = sample_proxy(model, tokenizer, self.settings.proxy, progress=self.progress)
        save_proxy_jsonl(samples, self.proxy_path, self.settings.proxy)
        _log.info("proxy set ready in %.0f s", time.perf_counter() - started)

    def base(self) -> tuple[Any, Any]:
        """The untouched base model and tokenizer used for every evaluation (loaded once)."""
        if self._base is None:
            self._base = load_model(self.settings.model)
        return self._base

    def adapted(self, adapter: Path) -> contextlib.AbstractContextManager[tuple[Any, Any]]:
        """The saved ``adapter`` on the base model (a ``PeftModel`` in eval mode) and the tokenizer; the adapter
        is unloaded on leaving, so the base is untouched for the next one."""
        from peft import PeftModel

        return self.peft_on_base(lambda base: PeftModel.from_pretrained(base, str(adapter)))

    @contextlib.contextmanager
    def peft_on_base(self, build: Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
        """The peft model ``build`` makes from the base model (in eval mode) and the tokenizer; unloaded on
        leaving, so the base is untouched for the next one."""
        base, tokenizer = self.base()
        model = build(base).eval()
        try:
            yield model, tokenizer
        finally:
            self._base = (model.unload(), tokenizer)

    def base_evaluation(self) -> dict[str, Any]:
        """The base model's measures (``shared/base_evaluation.json``, measured once)."""
        path = self.directory / "base_evaluation.json"
        if not path.is_file():
            with self._computed_once("base_evaluation"):
                if not path.is_file():
                    _log.info("measuring the base model")
                    model, tokenizer = self.base()
                    write_json(path, measure_base(model, tokenizer, self.suite(), progress=self.progress))
        return read_json_file(path, what="grid base evaluation")

    def suite(self) -> EvaluationSuite:
        """The evaluation's test items, questions and held-out passages (loaded once)."""
        if self._suite is None:
            self._suite = EvaluationSuite.load(self.settings.evaluation)
        return self._suite

    def statistics(self, seed: int) -> dict[str, Any]:
        """``{"members": key → module names, "pre": key → C_pre, "task": key → C_task}`` of ``seed``'s calibration
        batches (``shared/statistics_seed<seed>.pt``; C_pre is the same for every seed, stored once). Each C is a
        float32 (d_in, d_in) on the CPU, one per group of modules that read the same input (``members``)."""
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
        """Module name → (C_pre, C_task) of ``seed``, each (d_in, d_in)."""
        stats = self.statistics(seed)
        return {name: (stats["pre"][key], stats["task"][key]) for key, names in stats["members"].items()
                for name in names}

    def _compute_statistics(self, seed: int, pre_path: Path, task_path: Path) -> None:
        from peft import get_peft_model

        _log.info("collecting C_pre and C_task (seed %d) for the covariance baselines and forgetting measures", seed)
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


class TrainingData:
    """A fresh base model (seeded) with the grid's tokenized task data, split and batch order for ``seed``: the
    same for every method with the same seed."""

    def __init__(self, settings: GridSettings, seed: int, *, steps: int) -> None:
        self.settings, self.seed = settings, seed
        self.model, self.tokenizer = load_model(settings.model, seed=seed)
        dataset = build_task_dataset(settings.data, self.tokenizer, max_length=settings.max_seq_len)
        self.train_set, _ = split_train_eval(dataset, eval_fraction=0.1, seed=seed)
        self.collate = TaskCollator(pad_token_id=self.tokenizer.pad_token_id)
        self.order = batch_order(len(self.train_set), settings.batch_size, steps, seed)
        torch.manual_seed(seed)  # the LoRA init drawn next is the same for every method with this seed

    def lora_config(self, method: str):
        """``method``'s peft ``LoraConfig`` with the grid's rank, alpha and target modules (no dropout)."""
        settings = self.settings
        return lora_config(method, rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=0.0,
                           targets=settings.target_modules)

    def batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """The micro-batches of optimizer step ``step`` (one: input_ids, labels, attention_mask of (batch, seq))."""
        yield self.collate([self.train_set[i] for i in self.order[step]])

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """The batches of the first ``calibration_steps`` steps: where the initial C_task comes from."""
        return [batch for step in range(min(self.settings.calibration_steps, len(self.order)))
                for batch in self.batches(step)]
