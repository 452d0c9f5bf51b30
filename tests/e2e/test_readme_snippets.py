"""The README's Python snippets run as printed, with the user's objects (a peft model, batches) supplied.

The snippets are read from README.md, not copied here, so a README that drifts from the package (a moved import,
a renamed method) fails this test. The plain-loop snippet runs in one process; the ``folora_ds.initialize``
snippet runs on 2 gloo ranks, as it says it does. The Hugging Face snippet needs TensorBoard (``report_to``) and
500 steps: only its imports run here; ``tests/distributed/test_hf_trainer.py`` runs the trainer itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from folora_ds.method.config import FoLoRAConfig
from tests.testing.ranks import base_model, batch, proxy_batch, run_ranks

REPO = Path(__file__).resolve().parents[2]
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)


def _readme_snippet(marker: str) -> str:
    """The README's one Python snippet that contains ``marker``."""
    found = [code for code in SNIPPET.findall((REPO / "README.md").read_text(encoding="utf-8")) if marker in code]
    assert len(found) == 1, f"README.md has {len(found)} Python snippets with {marker!r}"
    return found[0]


def _user_model(config_path: Path):
    """A tiny peft Llama adapted the way the snippet's DeepSpeed config says (its LoRA rank and targets)."""
    folora = FoLoRAConfig.from_deepspeed_config(config_path)
    torch.manual_seed(0)
    return get_peft_model(base_model(), LoraConfig(r=folora.lora_rank, lora_alpha=folora.lora_alpha,
                                                   target_modules=list(folora.target_modules)))


def _user_folder(folder: Path) -> Path:
    """``folder`` with the repository's ``ds_configs/`` in it, as a user's clone has (made once, before any rank
    starts: ranks creating it together would race)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ds_configs").symlink_to(REPO / "ds_configs")
    return folder


def test_the_plain_loop_snippet_trains_exports_and_saves_its_state(tmp_path, monkeypatch):
    monkeypatch.chdir(_user_folder(tmp_path))
    code = _readme_snippet("FoLoRAController(peft_model, config)")
    loader = [batch(100 + index) for index in range(5)]
    namespace = {"torch": torch, "peft_model": _user_model(REPO / "ds_configs" / "single_process.json"),
                 "proxy_batches": [proxy_batch(index) for index in range(4)],
                 "task_batches": [batch(index) for index in range(4)], "loader": loader}
    exec(compile(code, "README.md (plain loop)", "exec"), namespace)
    controller = namespace["controller"]
    assert controller.optimizer_steps == len(loader)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert torch.load(tmp_path / "folora_state.pt", weights_only=False)["optimizer_steps"] == len(loader)


def _initialize_snippet(rank: int, world: int, folder: str) -> dict:
    os.chdir(folder)
    code = _readme_snippet("folora_ds.initialize(\n")
    namespace = {"peft_model": _user_model(Path("ds_configs") / "zero2.json"),
                 "my_proxy_shard": [proxy_batch(index) for index in range(4) if index % world == rank],
                 "my_task_calibration_shard": [batch(index) for index in range(4) if index % world == rank],
                 "my_micro_batches": [batch(200 + 4 * rank + index) for index in range(4)]}
    exec(compile(code, "README.md (folora_ds.initialize)", "exec"), namespace)
    controller = namespace["controller"]
    return {"steps": controller.optimizer_steps, "gated": controller.gated_step_counts()}


def test_the_initialize_snippet_runs_on_two_ranks_with_a_checkpoint_and_an_adapter(tmp_path):
    results = run_ranks(2, _initialize_snippet, str(_user_folder(tmp_path)))
    for result in results:  # zero2.json: 2 micro-batches per optimizer step, 4 per rank
        assert result["steps"] == 2 and set(result["gated"]) == {2}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    parts = sorted(path.name for path in (tmp_path / "ckpt").glob("*/folora_state/*.pt"))
    assert parts == ["rank_00000_of_00002.pt", "rank_00001_of_00002.pt"]


def test_the_hugging_face_snippets_imports_resolve():
    code = _readme_snippet("from folora_ds.hf import")
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("from ", "import ")))
    namespace: dict = {}
    exec(compile(imports, "README.md (Hugging Face imports)", "exec"), namespace)
    assert namespace["FoLoRATrainer"].__name__ and callable(namespace["folora_trainer_class"])
