"""`gptcore doctor`: before a long run, check in seconds what the current params need — the params file
itself, every download (mirror files, or the servers), disk for the chosen foundation, the judge's Ollama
server when the judge is in the plan, the C compiler and CPU features of the decoding kernels, torch and
the device — and say, for each problem, how to fix it (as `brew doctor` or `flutter doctor`).

The plan is what `dvc repro TARGET...` would run: the targets and every stage upstream of them in
dvc.yaml (every stage without targets).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from gptcore.download import MIRROR_ENV, NO_OPENAI_HINT, mirror_root
from gptcore.errors import ConfigError, GptcoreError

_TEMPLATE = re.compile(r"\$\{([^}]+)\}")  # DVC's ${...} interpolation, as in dvc.yaml

QUICK_START = "or run the quick start (README: Quick start; params-quickstart.yaml), which needs only the mirror"
MIRROR_FIX = f"set {MIRROR_ENV} to a folder laid out like ../shared/mirror (offline), or check the network"
# Disk a foundation needs, in multiples of its fp32 weights: the download, the converted foundation, the
# classifier and instruction models (each in the workspace and DVC's cache) and the exports. A rough bound.
DISK_FACTOR = 9
SPARE_BYTES = 1 << 30  # data, plots, progress files and the tokenizer


@dataclass(frozen=True)
class Finding:
    """One line of the report: `ok`, `warn` (works, slower or partly) or `fail` (the plan cannot run)."""

    status: str
    topic: str
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:4}  {self.topic}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")


def stages_in_plan(
    dvc_yaml: str | os.PathLike, targets: list[str] | tuple[str, ...] = (), params: dict | None = None
) -> dict[str, dict]:
    """The stages `dvc repro TARGET...` runs: the targets and every stage whose outs they depend on.

    `${key}` / `${section.key}` in a stage are filled in from `params` (the params file as a dict;
    default: the params.yaml beside dvc.yaml, as DVC does), so a dep such as the foundation stage's
    `models/${foundation}` links to the stage that writes the folder in use.
    """
    declared = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"]
    unknown = [t for t in targets if t not in declared]
    if unknown:
        raise ConfigError(f"{dvc_yaml}: no stage {', '.join(unknown)}; stages: {', '.join(declared)}")
    if params is None:
        beside = Path(dvc_yaml).parent / "params.yaml"
        params = yaml.safe_load(beside.read_text(encoding="utf-8")) if beside.is_file() else {}
    stages = {
        name: _fill(stage, params or {})
        for group, entry in declared.items()
        for name, stage in _instances(group, entry)
    }
    producer = {out: name for name, stage in stages.items() for out in _paths(stage.get("outs", []))}
    plan, todo = set(), [name for name in stages if not targets or name.split("@")[0] in targets]
    while todo:
        name = todo.pop()
        if name not in plan:
            plan.add(name)
            deps = _paths(stages[name].get("deps", []))  # an out's file, or a folder of outs, counts too
            todo += [
                producer[o] for o in producer for d in deps if d == o or o.startswith(d + "/") or d.startswith(o + "/")
            ]
    return {name: stages[name] for name in stages if name in plan}


def _instances(name: str, stage: dict) -> list[tuple[str, dict]]:
    """A stage, or a `foreach` stage's instances `name@key` (DVC's names), ${key} and ${item.x} filled in."""
    if "foreach" not in stage:
        return [(name, stage)]
    text = yaml.safe_dump(stage["do"])
    out = []
    for key, item in stage["foreach"].items():
        filled = text.replace("${key}", str(key))
        for field, value in item.items() if isinstance(item, dict) else [("", item)]:
            filled = filled.replace("${item." + field + "}" if field else "${item}", str(value))
        out.append((f"{name}@{key}", yaml.safe_load(filled)))
    return out


def _fill(value, params: dict):
    """`value` (a stage, or any part of it) with each `${dotted.key}` that params holds replaced by its value."""
    if isinstance(value, dict):
        return {_fill(key, params): _fill(item, params) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, params) for item in value]
    if isinstance(value, str):
        return _TEMPLATE.sub(lambda match: _lookup(params, match.group(1), match.group(0)), value)
    return value


def _lookup(params: dict, dotted: str, unresolved: str) -> str:
    value = params
    for part in dotted.strip().split("."):
        if not isinstance(value, dict) or part not in value:
            return unresolved
        value = value[part]
    return unresolved if isinstance(value, (dict, list)) else str(value)


def _paths(entries: list) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def diagnose(params_path: str | os.PathLike, dvc_yaml: str | os.PathLike, targets=()) -> list[Finding]:
    """Every check, in the report's order; the params and the plan first, since the rest depend on them."""
    from gptcore.params.load import load_params

    try:
        params = load_params(params_path)
    except ConfigError as err:
        problems = getattr(err, "problems", None)
        message = f"{params_path}: {'; '.join(problems)}" if problems else " ".join(str(err).split())
        return [Finding("fail", "params", message, "edit the keys named"), *_machine_checks(None)]
    plan = stages_in_plan(dvc_yaml, targets, yaml.safe_load(Path(params_path).read_text(encoding="utf-8")))
    findings = [Finding("ok", "params", f"{params_path} is valid; {len(plan)} stage(s) in the plan")]
    findings += _source_checks(params, plan, Path(dvc_yaml).parent)
    findings.append(_disk_check(params, plan, Path(dvc_yaml).parent))
    if "judge" in plan:
        findings.append(_judge_check(params.judge))
    return findings + _machine_checks(params)


@dataclass(frozen=True)
class Source:
    """Something the plan downloads: its addresses, and its files as (name in the mirror, local copy)."""

    what: str
    urls: list[str]
    files: list[tuple[str, Path]]
    openai: bool = False  # an OpenAI checkpoint, which `foundation: scratch|pretrained` does without


def _sources(params, plan: dict[str, dict], repo: Path) -> list[Source]:
    """What the plan downloads; a file whose local copy (the stage's out, the cache) exists is not needed."""
    from gptcore.data.sms import MIRROR_NAME as SMS_NAME

    outs = {name: repo / _paths(stage.get("outs", []))[0] for name, stage in plan.items() if stage.get("outs")}
    wanted = []
    if "download_corpus" in plan:
        url = params.download_corpus.url
        wanted.append(Source("the Verdict (Stage 1 corpus)", [url], [(_basename(url), outs["download_corpus"])]))
    if "download_sms" in plan:
        sms = params.download_sms
        urls = [sms.url, *([sms.backup_url] if sms.backup_url else [])]
        wanted.append(Source("the SMS Spam Collection", urls, [(SMS_NAME, outs["download_sms"])]))
    if "download_instructions" in plan:
        url = params.download_instructions.url
        wanted.append(Source("the instruction data", [url], [(_basename(url), outs["download_instructions"])]))
    if "download_preferences" in plan:
        url = params.download_preferences.url
        wanted.append(Source("the preference data", [url], [(_basename(url), outs["download_preferences"])]))
    if any(not name.startswith("download_") for name in plan):
        from gptcore.download import cache_dir
        from gptcore.tokenizer import BASE_URL, FILES

        files = [(f"gpt2/{name}", cache_dir() / "gpt2" / name) for name in FILES]
        wanted.append(Source("GPT-2's tokenizer files", [BASE_URL], files))
    return wanted + _openai_sources(params, plan, repo)


def _openai_sources(params, plan: dict[str, dict], repo: Path) -> list[Source]:
    from gptcore.config import OPENAI_SIZES

    if "download_gpt2" not in plan or params.foundation not in OPENAI_SIZES:
        return []
    from gptcore.convert.openai_download import CHECKPOINT_FILES

    size = OPENAI_SIZES[params.foundation]
    url = f"{params.download_gpt2.base_url.rstrip('/')}/{size}"
    # The stage's out named after the foundation: the folder that holds a checkpoint it fetched.
    (fetched,) = [repo / o for o in _paths(plan["download_gpt2"]["outs"]) if Path(o).name == params.foundation]
    files = [(f"gpt2/models/{size}/{name}", fetched / name) for name in CHECKPOINT_FILES]
    return [Source(f"OpenAI's {size} checkpoint (foundation: {params.foundation})", [url], files, openai=True)]


def _basename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _source_checks(params, plan: dict[str, dict], repo: Path) -> list[Finding]:
    """One line per source with a file missing from the mirror or a server out of reach, else one ok line."""
    root = mirror_root()
    problems, count = [], 0
    for source in _sources(params, plan, repo):
        names = [name for name, local in source.files if not local.is_file()]
        count += len(names)
        way_out = f"; {NO_OPENAI_HINT}; {QUICK_START}" if source.openai else ""
        missing = [name for name in names if root is not None and not (root / name).is_file()]
        if missing:
            listed = ", ".join(missing) if len(missing) <= 2 else f"{missing[0]} and {len(missing) - 1} more"
            fix = f"put them in the mirror, or unset {MIRROR_ENV} to download them{way_out}"
            problems.append(Finding("fail", "source", f"{source.what}: not in the mirror {root}: {listed}", fix))
        elif names and root is None and not any(_reachable(url) for url in source.urls):
            problems.append(
                Finding("fail", "source", f"{source.what}: cannot reach {source.urls[0]}", MIRROR_FIX + way_out)
            )
    if problems:
        return problems
    where = f"in the mirror {root}" if root is not None else "on reachable servers"
    return [Finding("ok", "source", f"{count} file(s) to fetch, all {where}")]


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the server of url answers at all (any HTTP status), within timeout seconds."""
    import requests

    parts = urlsplit(url)
    try:
        requests.head(f"{parts.scheme}://{parts.netloc}/", timeout=timeout, allow_redirects=False)
    except requests.RequestException:
        return False
    return True


def _disk_check(params, plan: dict[str, dict], repo: Path) -> Finding:
    from gptcore.config import OPENAI_SIZES, GPTConfig

    openai = params.foundation in OPENAI_SIZES and "foundation" in plan
    parameters = _parameters(GPTConfig.from_name(params.foundation) if openai else params.pretrain.model)
    need = DISK_FACTOR * 4 * parameters + SPARE_BYTES
    free = shutil.disk_usage(repo.resolve()).free
    model = params.foundation if openai else "the Stage 1 architecture"
    what = f"about {need / 1e9:.1f} GB needed by the plan ({model}), {free / 1e9:.1f} GB free"
    if free < need:
        return Finding("fail", "disk", what, f"free space under {repo.resolve()}, or choose a smaller foundation")
    return Finding("ok", "disk", what)


def _parameters(config) -> int:
    """Weights of a GPT config (embeddings, blocks, final norm, head unless tied), without building it."""
    d, vocab, ctx = config.emb_dim, config.vocab_size, config.context_length
    block = 12 * d * d + 13 * d  # attention (4 d^2 + biases) + feed-forward (8 d^2 + biases) + 2 norms
    head = 0 if getattr(config, "tie_embeddings", False) else d * vocab
    return vocab * d + ctx * d + config.n_layers * block + 2 * d + head


def _judge_check(judge) -> Finding:
    """The judge's Ollama server answers and holds the judge model."""
    import requests

    fix = (
        f"start Ollama (`ollama serve`), `ollama pull {judge.model}`, or point judge.url at a running server; "
        "or leave the judge out of the plan: name the stages to run, as the quick start does"
    )
    try:
        response = requests.get(f"{judge.url.rstrip('/')}/api/tags", timeout=3.0)
        names = {m.get("name") for m in response.json().get("models", [])}
    except (requests.RequestException, ValueError, AttributeError):
        return Finding("fail", "judge", f"no Ollama server answers at {judge.url}", fix)
    if judge.model not in names and f"{judge.model}:latest" not in names:
        return Finding("fail", "judge", f"{judge.url} does not have {judge.model}", f"ollama pull {judge.model}")
    return Finding("ok", "judge", f"{judge.url} serves {judge.model}")


def _machine_checks(params) -> list[Finding]:
    return [_kernel_check(), _torch_check(params.device if params is not None else "auto")]


def _kernel_check() -> Finding:
    """The decoding kernels build with $CC (else torch's slower products) and the CPU features they use."""
    from gptcore.inference import kernels

    flags = _cpu_flags()
    features = ", ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16") if f in flags) or "none listed"
    compiler = os.environ.get("CC", "cc")
    if kernels.load_kernels() is None:
        fix = "install a C compiler with OpenMP (e.g. apt-get install gcc), or set CC to one"
        return Finding("warn", "kernels", f"cannot build gemv.c with {compiler}: decoding is slower", fix)
    return Finding("ok", "kernels", f"{kernels.describe()}, built with {compiler}; CPU: {features}")


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _torch_check(device_name: str) -> Finding:
    import torch

    from gptcore.device import resolve_device

    build = f"torch {torch.version.__version__}" + (
        f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"
    )
    try:
        device = resolve_device(device_name)
    except GptcoreError as err:
        return Finding("fail", "torch", f"{build}; {err}", "set device: auto (or cpu) in params.yaml")
    return Finding("ok", "torch", f"{build}; device {device_name} -> {device}, {torch.get_num_threads()} threads")
