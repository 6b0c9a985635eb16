"""The allocator setting for work whose tensor shapes repeat: keep freed memory for reuse.

glibc's malloc gives every block above its mmap threshold (128 KiB, rising to at most 32 MiB) a
mapping of its own and unmaps it on free; the next block of that size is faulted in again page by page
and zeroed by the kernel. A training step of fixed shapes allocates and frees the same large
activation, gradient and cast buffers every time, so with the defaults the 774M bf16 step took 0.8-1.4
million page faults (3-6 GiB zeroed) and 16-17 s; served from a heap that is never trimmed it takes
none and 14 s (peak RSS 14.5 -> 14.6 GiB; the 124M step 2.9 -> 3.5 GiB).

Where shapes change from step to step the one heap fragments: 40 training steps of 124M on batches of
41-257 tokens grew to 9.5 GiB resident instead of a 5.4 GiB peak. A long-lived server (`gptcore serve`)
and generation over prompts of every length (generate_responses) are such work, and so is instruction
finetuning, whose batches are as long as their longest entry.

So the setting is not the library's to make: it belongs to the process, and is made by whoever starts
it, before Python runs, through glibc's tunables (other C libraries ignore the variable):

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=0xffffffffffffffff python ...

dvc.yaml prefixes the commands of the fixed-shape training stages (pretrain, finetune_classifier) with
it; `gptcore bench` gives it to gptcore's worker process (and to HF's with --hf-keep-freed-memory).
Memory kept this way stays with the process until it exits. Nothing in this module changes the
process it runs in.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

ENV = "GLIBC_TUNABLES"
# mmap_max=0: no block gets a mapping of its own; trim_threshold at its maximum: the free top of the
# heap is never returned (what mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1) set).
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=0xffffffffffffffff"
# The prefix of a shell command (dvc.yaml's `cmd`) that starts a process with the setting.
COMMAND_PREFIX = f"{ENV}={TUNABLES} "


def allocator_env(keep_freed: bool, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ` (default: os.environ) for a child process: with the setting (keep_freed) or
    with the allocator's defaults. Other tunables the user set are kept."""
    env = dict(os.environ if environ is None else environ)
    ours = TUNABLES.split(":")
    names = {item.split("=", 1)[0] for item in ours}
    items = [item for item in env.get(ENV, "").split(":") if item and item.split("=", 1)[0] not in names]
    items += ours if keep_freed else []
    if items:
        env[ENV] = ":".join(items)
    else:
        env.pop(ENV, None)
    return env


def keeps_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a process of this Python started with `environ` (default: this one's) has the setting:
    glibc's, and GLIBC_TUNABLES holding it (glibc read it at start; changing os.environ later changes
    nothing)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    value = (os.environ if environ is None else environ).get(ENV, "")
    settings = dict(item.split("=", 1) for item in value.split(":") if "=" in item)
    wanted = dict(item.split("=", 1) for item in TUNABLES.split(":"))
    return all(settings.get(name) == setting for name, setting in wanted.items())
