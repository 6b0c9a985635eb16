"""keep_freed_memory: a freed large tensor's memory is reused without faulting it in again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore.memory import ENV

# Eight training steps of the same shapes on a tiny model with GPT-2's vocabulary: its logits and their
# gradients ([8, 64, 50257] floats, 100 MiB) are blocks that glibc maps afresh on every step by default.
STEPS = r"""
import json, resource, torch
from gptcore.memory import keep_freed_memory
applied = keep_freed_memory()
from gptcore.config import GPTConfig
from gptcore.model import GPTModel
from gptcore.train import StepRunner, lm_loss, make_optimizer
torch.manual_seed(0)
model = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=1))
runner = StepRunner(model, make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1), lm_loss, torch.device("cpu"))
ids = torch.randint(0, 50257, (8, 65))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    runner.step((ids[:, :-1], ids[:, 1:]))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _steps(setting: str) -> dict:
    env = {**os.environ, ENV: setting}
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_repeated_steps_reuse_freed_memory_instead_of_faulting_it_in():
    kept, default = _steps("1"), _steps("0")
    assert kept["applied"] is True and default["applied"] is False
    logits_pages = 8 * 64 * 50257 * 4 // os.sysconf("SC_PAGE_SIZE")
    # By default every step faults in at least its logits afresh.
    assert all(f >= logits_pages for f in default["faults"]), default
    # Kept: the heap has (nearly always) grown to fit by the third step; the last four steps together
    # fault in less than half of what the default does (measured: 0-75k pages against 400k).
    assert sum(kept["faults"][4:]) < sum(default["faults"][4:]) / 2, (kept, default)


def test_generation_and_fixed_shape_entry_points_apply_it(monkeypatch, tmp_path, mirror_dir):
    from gptcore import memory
    from gptcore.cli import main as cli_main
    from gptcore.config import GPTConfig
    from gptcore.model import GPTModel
    from gptcore.weights import save_model

    path = tmp_path / "tiny.safetensors"
    save_model(GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)), path)
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli_main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert calls == [1]
    for stage in ("pretrain", "finetune_classifier", "generate_responses"):
        assert "keep_freed_memory()" in (Path(__file__).parents[1] / "stages" / f"{stage}.py").read_text()
    # Instruction batches are as long as their longest entry: varying shapes would fragment the heap.
    assert "keep_freed_memory" not in (Path(__file__).parents[1] / "stages" / "finetune_instructions.py").read_text()
