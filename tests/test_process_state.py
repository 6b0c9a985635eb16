"""Library calls leave the process as they found it (issue #18): no process-wide side effects.

Each case calls public entry points of gptcore on tiny inputs between two snapshots of what a caller
can observe of the process (RNG states, umask, signal handlers, the environment, warnings filters,
logging, torch's global settings, the matplotlib backend, glibc's allocator setting...) and
compares them. A caller seeds, sets a umask or installs a handler for reasons of its own; a library
that resets any of them breaks that caller far from the cause.

Third-party modules are imported before the first snapshot: what they do at import is theirs. Unseeded
random initialisation (`GPTModel(config)`, like any nn.Module) draws from torch's global generator
by design, so the cases here build their inputs before the snapshot or pass a seed.
"""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import gc
import hashlib
import logging
import os
import platform
import random
import signal
import socket
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcore.config import GPTConfig

SIGNALS = [s for s in ("SIGINT", "SIGTERM", "SIGPIPE", "SIGHUP", "SIGUSR1") if hasattr(signal, s)]


# --- what a caller can see ---------------------------------------------------------------------------


def _umask() -> int:
    """The umask, read without changing it where Linux shows it (/proc/self/status, Linux >= 4.7)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore, in the test only
    os.umask(mask)
    return mask


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _large_blocks_get_own_mapping() -> bool | None:
    """glibc: does a 2 GiB malloc get a mapping of its own (the default), or come from the heap
    (mallopt(M_MMAP_MAX, 0) or the glibc.malloc.mmap_max=0 tunable)? None elsewhere.

    glibc serves a request from free heap chunks before it considers a mapping, so the probe asks for
    more than any free chunk of these tests can hold (2 GiB, never touched: address space only), and it
    is far above the dynamic mmap threshold's ceiling (32 MiB), so the probe does not move that either.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 30)
    try:
        return libc.mallinfo2().hblks > before
    finally:
        libc.free(block)


def _numpy_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, keys.tobytes(), pos, has_gauss, cached


def snapshot() -> dict:
    import matplotlib

    root = logging.getLogger()
    state = {
        "torch_rng": torch.random.get_rng_state().numpy().tobytes(),
        "cuda_initialized": torch.cuda.is_initialized(),
        "numpy_rng": _numpy_state(),
        "python_rng": random.getstate(),
        "umask": _umask(),
        "signal_handlers": {name: signal.getsignal(getattr(signal, name)) for name in SIGNALS},
        "environ": dict(os.environ),
        "warnings_filters": list(warnings.filters),
        "logging": (root.level, list(root.handlers), logging.root.manager.disable),
        "matplotlib_backend": matplotlib.get_backend(),
        "torch_threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "torch_defaults": (
            torch.get_default_dtype(),
            torch.get_default_device(),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            torch.get_float32_matmul_precision(),
            torch.is_autocast_enabled("cpu"),
        ),
        "torch_backends": (
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.mkldnn.enabled,
        ),
        "allocator_maps_large_blocks": _large_blocks_get_own_mapping(),
        "cwd": os.getcwd(),
        "sys": (
            sys.getrecursionlimit(),
            sys.getswitchinterval(),
            sys.excepthook,
            sys.stdout,
            sys.stderr,
            list(sys.path),
        ),
        "gc": (gc.isenabled(), gc.get_threshold()),
        "faulthandler": faulthandler.is_enabled(),
        "socket_timeout": socket.getdefaulttimeout(),
        "non_daemon_threads": sorted(t.name for t in threading.enumerate() if not t.daemon),
    }
    if torch.cuda.is_initialized():
        state["cuda_rng"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def changes(before: dict, after: dict) -> dict:
    """What differs, readably: RNG states by digest, the environment by variable."""
    found = {}
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key == "environ":
            old, new = ({k: v for k, v in env.items() if old.get(k) != new.get(k)} for env in (old, new))
        found[key] = tuple(_short(v) for v in (old, new))
    return found


def _short(value):
    if isinstance(value, bytes):
        return f"<{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()[:12]}>"
    if isinstance(value, tuple):
        return tuple(_short(v) for v in value)
    return value


def _calls(calls: dict) -> dict:
    """Calls that leave no trace in a snapshot: a umask set for a moment (it races with threads creating
    files), an exit handler gptcore registered."""
    return {name: made for name, made in calls.items() if made}


@pytest.fixture
def calls(monkeypatch):
    """Every os.umask call, and every atexit.register of a gptcore function, while the case runs (third
    parties register their own, tqdm one per progress bar's monitor thread)."""
    made = {"os.umask": [], "atexit.register": []}
    umask, register = os.umask, atexit.register

    def umask_spy(mask):
        made["os.umask"].append(mask)
        return umask(mask)

    def register_spy(fn, *args, **kwargs):
        if getattr(fn, "__module__", "").startswith("gptcore"):
            made["atexit.register"].append(fn)
        return register(fn, *args, **kwargs)

    monkeypatch.setattr(os, "umask", umask_spy)
    monkeypatch.setattr(atexit, "register", register_spy)
    return made


@pytest.fixture
def foreign_backend():
    """A caller's own matplotlib backend (not Agg, which a plot call might set), put back afterwards."""
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    yield "svg"
    matplotlib.use(previous)


# --- the cases: public entry points on tiny inputs --------------------------------------------------

TINY = dict(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, mirror_dir, stage_inputs):
    """Weights files (LM with dropout, classifier), the corpus; built before any snapshot."""
    from gptcore.model import GPTModel
    from gptcore.recipes.classifier import ClassifierInfo, build_classifier, save_classifier
    from gptcore.weights import save_model

    root = tmp_path_factory.mktemp("process-state")
    # torch imports torch._dynamo the first time an optimizer is built, which sets TORCHINDUCTOR_CACHE_DIR
    # and registers atexit handlers: torch's doing, done here before any snapshot.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    import matplotlib.pyplot  # noqa: F401

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    lm = GPTModel(GPTConfig(**TINY, drop_rate=0.1))
    save_model(lm, root / "lm.safetensors")
    classifier = build_classifier(lm.config, lm.state_dict(), 2, seed=1)
    save_classifier(classifier, ClassifierInfo(max_length=24), root / "classifier.safetensors")
    torch.random.set_rng_state(generator_state)
    return {
        "root": root,
        "lm": root / "lm.safetensors",
        "classifier": root / "classifier.safetensors",
        "corpus": mirror_dir / "the-verdict.txt",
        "stage": stage_inputs,
    }


def _tokenizer(ctx, tmp):
    from gptcore.tokenizer import encode_text, get_tokenizer

    assert encode_text(get_tokenizer(), "Every effort moves you")


def _random_model(ctx, tmp):
    from gptcore.model import random_model

    for init in ("gpt2", "pytorch"):
        random_model(GPTConfig(**TINY), init, seed=7)


def _weights(ctx, tmp):
    from gptcore.weights import load_model, save_model

    model = load_model(ctx["lm"])
    save_model(model, tmp / "copy.safetensors")
    load_model(tmp / "copy.safetensors")


def _generate(ctx, tmp):
    from gptcore.inference.decoding import generate, generate_batch, make_generator
    from gptcore.weights import load_model

    model = load_model(ctx["lm"])
    idx = torch.tensor([[464, 3290, 318]])
    generate(model, idx, 3)
    generate(model, idx, 3, temperature=1.0, top_k=5, generator=make_generator(5))
    generate_batch(model, [[464, 3290], [318]], 3, temperature=0.8, generator=make_generator(5))


def _build_classifier(ctx, tmp):
    from gptcore.recipes.classifier import build_classifier, classify_texts, load_classifier, load_foundation
    from gptcore.tokenizer import get_tokenizer

    load_foundation(ctx["lm"], 2, seed=123)
    model, info = load_classifier(ctx["classifier"])
    classify_texts(model, info, get_tokenizer(), ["WINNER! Call now", "see you"])
    build_classifier(model.config, model.state_dict(), 3, seed=5)


def _train(ctx, tmp):
    """The shared loop, twice: a fresh run that saves progress, then one that resumes it (its RNG state)."""
    from gptcore.data.text import build_text_loaders
    from gptcore.tokenizer import get_tokenizer
    from gptcore.training.evaluation import lm_loss, loss_evaluator
    from gptcore.training.loop import LoopOptions, train
    from gptcore.training.progress import Progress
    from gptcore.training.step import make_optimizer
    from gptcore.weights import load_model

    text = ctx["corpus"].read_text()[:4000]
    loaders = build_text_loaders(text, get_tokenizer(), max_length=32, stride=32, batch_size=4, train_ratio=0.9, seed=1)
    device = torch.device("cpu")
    evaluate = loss_evaluator(*loaders, lm_loss, device, "fp32", 1)
    for epochs in (1, 2):
        model = load_model(ctx["lm"])
        optimizer = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1, device=device)
        options = LoopOptions(epochs=epochs, eval_every=100, seed=3, show_progress=False)
        train(model, optimizer, loaders[0], lm_loss, evaluate, device, options, "fp32", Progress(tmp / "ck", "id", 0.0))


def _pretrain(ctx, tmp):
    from gptcore.params.schema import PretrainParams, RunConfig
    from gptcore.recipes.pretrain import pretrain

    params = PretrainParams(
        model=GPTConfig(**{**TINY, "context_length": 64}, drop_rate=0.1),
        epochs=1,
        batch_size=8,
        eval_every=100,
        eval_batches=1,
        sample_tokens=2,
        progress_minutes=0,
    )
    pretrain(ctx["corpus"], params, RunConfig(seed=11, device="cpu", precision="fp32"), tmp / "ck", show_progress=False)


def _finetune_classifier(ctx, tmp):
    from gptcore.params.schema import ClassifierParams, RunConfig
    from gptcore.recipes.classify import finetune_classifier

    stage = ctx["stage"]
    splits = {name: stage / f"{name}.csv" for name in ("train", "validation", "test")}
    params = ClassifierParams(epochs=1, batch_size=50, eval_every=100, eval_batches=1, progress_minutes=0)
    finetune_classifier(
        ctx["lm"], splits, params, RunConfig(seed=2, device="cpu", precision="fp32"), tmp / "ck", show_progress=False
    )


def _instructions(ctx, tmp):
    from gptcore.params.schema import GenerateParams, InstructionsParams, RunConfig
    from gptcore.recipes.instruct import finetune_instructions, generate_responses
    from gptcore.weights import save_model

    stage = ctx["stage"]
    run = RunConfig(seed=4, device="cpu", precision="fp32")
    params = InstructionsParams(
        epochs=1, batch_size=16, eval_every=100, eval_batches=1, allowed_max_length=32, progress_minutes=0
    )
    outcome = finetune_instructions(
        ctx["lm"], stage / "train.json", stage / "val.json", params, run, tmp / "ck", show_progress=False
    )
    save_model(outcome.model, tmp / "instruct.safetensors")
    generate_responses(
        tmp / "instruct.safetensors",
        stage / "test.json",
        GenerateParams(max_new_tokens=2, batch_size=8, temperature=1.0, seed=9),
        run,
        tmp / "log.jsonl",
        show_progress=False,
    )


def _atomic(ctx, tmp):
    from gptcore.atomic import atomic_dir, write_json, write_text

    write_text(tmp / "a.txt", "a")
    write_json(tmp / "sub" / "b.json", {"b": 1})
    with atomic_dir(tmp / "folder") as folder:
        (folder / "c").write_text("c")


def _judge(ctx, tmp):
    from gptcore.recipes.judge.absolute import judge_prompt
    from gptcore.recipes.judge.scores import parse_score
    from gptcore.recipes.judge.statistics import bootstrap_interval, histogram_rows

    assert parse_score("Score: 87").value == 87
    parse_score('{"score": 40}')
    with pytest.raises(ValueError):
        parse_score("no number here")
    judge_prompt({"instruction": "Say hi.", "input": "", "output": "hi", "model_response": "hello"})
    bootstrap_interval([50.0, 60.0, 70.0], seed=1)
    histogram_rows([5, 55, 95])


def _export(ctx, tmp):
    from gptcore.convert.hf import convert_hf_folder
    from gptcore.export.gguf import export_gguf, write_modelfile
    from gptcore.export.hf import export_hf

    result = export_gguf(ctx["lm"], tmp / "lm.gguf")
    write_modelfile(tmp / "lm.gguf", result.config.context_length)
    export_hf(ctx["lm"], tmp / "hf")
    convert_hf_folder(tmp / "hf", tmp / "back.safetensors")


def _cli(ctx, tmp):
    """In-process CLI calls, as tests and scripts make them: generation and classification must not
    change the allocator (nor anything else) of the process they run in."""
    from gptcore.cli import main

    assert (
        main(
            [
                "generate",
                "--model",
                str(ctx["lm"]),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "2",
                "--temperature",
                "1",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert main(["classify", "--model", str(ctx["classifier"]), "free prize", "lunch?"]) == 0


def _bench_measure(ctx, tmp):
    from gptcore.bench.spec import BenchSpec
    from gptcore.bench.tasks import measure

    for task in ("train", "generate"):
        measure(
            BenchSpec(
                task=task,
                model=str(ctx["lm"]),
                device="cpu",
                precision="fp32",
                batch=2,
                seq_len=8,
                prompt_len=4,
                new_tokens=2,
                repeats=1,
                warmup=0,
                threads=1,
            )
        )


CASES = {
    "tokenizer": _tokenizer,
    "random_model": _random_model,
    "weights": _weights,
    "generate": _generate,
    "build_classifier": _build_classifier,
    "train": _train,
    "pretrain": _pretrain,
    "finetune_classifier": _finetune_classifier,
    "instructions": _instructions,
    "atomic": _atomic,
    "judge": _judge,
    "export": _export,
    "cli": _cli,
    "bench_measure": _bench_measure,
}


@pytest.mark.parametrize("case", CASES)
def test_library_calls_leave_the_process_state_unchanged(case, inputs, tmp_path, calls, foreign_backend, capsys):
    torch.manual_seed(20260)  # a caller's own stream, which every seeded call below must leave alone
    np.random.seed(1)
    random.seed(2)
    before = snapshot()
    CASES[case](inputs, tmp_path)
    assert changes(before, snapshot()) | _calls(calls) == {}


def test_openai_conversion_leaves_the_environment_alone(tmp_path, mirror_dir, monkeypatch, calls):
    """The TensorFlow reader: TensorFlow is imported first (its own doing); the variables that quiet it
    belong to the entry points (`gptcore convert`, stages/foundation.py), not to the library call."""
    pytest.importorskip("tensorflow")
    from gptcore.convert.openai import convert_checkpoint
    from tests.tf_checkpoints import openai_shapes, write_checkpoint

    hparams = dict(n_vocab=11, n_ctx=4, n_embd=8, n_head=2, n_layer=1)
    folder = write_checkpoint(tmp_path / "ckpt", hparams, openai_shapes(hparams), mirror_dir / "gpt2")
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):  # the helper above sets them for itself
        monkeypatch.delenv(name, raising=False)
    before = snapshot()
    convert_checkpoint(folder, tmp_path / "model.safetensors")
    assert changes(before, snapshot()) | _calls(calls) == {}


def test_plot_calls_keep_the_callers_matplotlib_backend(tmp_path, foreign_backend, calls):
    """Figures are drawn through matplotlib's Figure API and the Agg canvas: no matplotlib.use, no pyplot."""
    from gptcore.recipes.judge.statistics import histogram_rows
    from gptcore.training.plots import bar_figure, line_figure, save_png

    before = snapshot()
    rows = [{"step": 1, "train_loss": 2.0, "val_loss": 2.5}, {"step": 2, "train_loss": 1.5, "val_loss": 2.2}]
    save_png(
        line_figure(rows, "step", ["train_loss", "val_loss"], title="t", xlabel="x", ylabel="y"), tmp_path / "loss.png"
    )
    histogram = histogram_rows([10, 50, 90])
    save_png(
        bar_figure(
            [str(r["bin"]) for r in histogram], [r["count"] for r in histogram], title="t", xlabel="x", ylabel="y"
        ),
        tmp_path / "scores.png",
    )
    assert changes(before, snapshot()) | _calls(calls) == {}
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "scores.png").stat().st_size > 0


# --- the tool the library seeds with ------------------------------------------------------------------


def test_forked_rng_draws_what_manual_seed_gives_and_leaves_the_callers_stream():
    from gptcore.device import forked_rng

    torch.manual_seed(99)
    reference = torch.rand(3)  # the caller's next draw
    torch.manual_seed(5)
    seeded = torch.rand(3)
    torch.manual_seed(99)
    with forked_rng("cpu", seed=5):
        assert torch.equal(torch.rand(3), seeded)
    with forked_rng("cpu"):  # unseeded: the caller's stream, on a copy
        assert torch.equal(torch.rand(3), reference)
    assert torch.equal(torch.rand(3), reference)
    assert not torch.cuda.is_initialized()  # a CPU fork never starts CUDA


def test_seeded_random_model_equals_manual_seed_then_init():
    from gptcore.model import random_model

    config = GPTConfig(**TINY)
    for init in ("gpt2", "pytorch"):
        torch.manual_seed(3)
        expected = random_model(config, init).state_dict()
        got = random_model(config, init, seed=3).state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), init
