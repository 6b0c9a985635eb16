"""The allocator setting (gptcore/training/allocator.py): glibc's tunables keep freed memory for reuse; it is given
by the launcher of the fixed-shape training stages (dvc.yaml) and by `gptcore bench`, never by the library."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gptcore.training.allocator import COMMAND_PREFIX, ENV, TUNABLES, allocator_env, keeps_freed_memory

REPO = Path(__file__).resolve().parents[2]
# The training stages whose every step has the same shapes; not instruction finetuning (batches as long
# as their longest entry) nor generation (prompts of every length), where one heap fragments.
FIXED_SHAPE_STAGES = {"pretrain", "finetune_classifier"}

# Eight training steps of the same shapes on a tiny model with GPT-2's vocabulary: its logits and their
# gradients ([8, 64, 50257] floats, 100 MiB) are blocks that glibc maps afresh on every step by default.
STEPS = r"""
import json, resource, torch
from gptcore.config import GPTConfig
from gptcore.training.allocator import keeps_freed_memory
from gptcore.model import GPTModel
from gptcore.training.evaluation import lm_loss
from gptcore.training.step import StepRunner, make_optimizer
torch.manual_seed(0)
model = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=1))
runner = StepRunner(model, make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1), lm_loss, torch.device("cpu"))
ids = torch.randint(0, 50257, (8, 65))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    runner.step((ids[:, :-1], ids[:, 1:]))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"keeps": keeps_freed_memory(), "faults": faults}))
"""


def _steps(keep_freed: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", STEPS], env=allocator_env(keep_freed), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_the_tunables_make_repeated_steps_reuse_freed_memory_instead_of_faulting_it_in():
    import os

    kept, default = _steps(True), _steps(False)
    assert kept["keeps"] is True and default["keeps"] is False
    logits_pages = 8 * 64 * 50257 * 4 // os.sysconf("SC_PAGE_SIZE")
    # By default every step faults in at least its logits afresh.
    assert all(f >= logits_pages for f in default["faults"]), default
    # Kept: the heap has (nearly always) grown to fit by the third step; the last four steps together
    # fault in less than half of what the default does (measured: 0-75k pages against 400k).
    assert sum(kept["faults"][4:]) < sum(default["faults"][4:]) / 2, (kept, default)


def test_dvc_starts_exactly_the_fixed_shape_training_stages_with_the_setting():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = " ".join(stage.get("do", stage)["cmd"].split())
        if name in FIXED_SHAPE_STAGES:
            # ${launcher}: python, or torchrun's command line (params.yaml `launcher`, docs/distributed.md)
            assert cmd.startswith(COMMAND_PREFIX + f"${{launcher}} stages/{name}.py "), (name, cmd)
        else:  # serve-like and variable-shape work keeps the allocator's defaults
            assert ENV not in cmd, (name, cmd)


def test_no_library_code_changes_the_allocator():
    """No mallopt, and no ctypes handle on the C library (gptcore/inference/gemv.py loads only its own kernels)."""
    for path in sorted((REPO / "gptcore").rglob("*.py")) + sorted((REPO / "stages").glob("*.py")):
        text = path.read_text()
        assert ".mallopt(" not in text, path
        for libc in ("CDLL(None", 'find_library("c")', "libc.so", "ctypes.util"):
            assert libc not in text, (path, libc)


def test_allocator_env_adds_or_removes_only_its_own_tunables():
    user = {"PATH": "/bin", ENV: "glibc.malloc.arena_max=2"}
    kept = allocator_env(True, user)
    assert kept[ENV] == f"glibc.malloc.arena_max=2:{TUNABLES}" and kept["PATH"] == "/bin" and keeps_freed_memory(kept)
    assert allocator_env(False, kept)[ENV] == "glibc.malloc.arena_max=2"
    assert ENV not in allocator_env(False, {ENV: TUNABLES})
    assert allocator_env(True, {})[ENV] == TUNABLES
    assert not keeps_freed_memory({}) and not keeps_freed_memory({ENV: "glibc.malloc.mmap_max=0"})
    assert user == {"PATH": "/bin", ENV: "glibc.malloc.arena_max=2"}  # a copy
