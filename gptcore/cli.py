"""`gptcore VERB ...`: the command line, a thin layer of argument parsing over library calls."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gptcore.arguments import ArgumentParser, device_name, integer
from gptcore.entry import run_entry
from gptcore.errors import GptcoreError
from gptcore.sampling_flags import add_sampling_flags, sampling_from_flags


def _convert(args: argparse.Namespace) -> int:
    from gptcore.convert.hf import convert_hf_folder, is_hf_folder
    from gptcore.convert.peft import convert_peft_folder, is_peft_folder

    if is_peft_folder(args.checkpoint):  # a PEFT LoRA folder: adapter_config.json + adapter_model.safetensors
        imported = convert_peft_folder(args.checkpoint, args.out, args.base)
        kind = "foreign PEFT" if imported.foreign else "gptcore"
        print(f"converted a {kind} LoRA adapter (rank {imported.config.rank}) -> {args.out}")
        return 0
    if args.base is not None:
        raise GptcoreError(f"--base: only for a PEFT adapter folder; {args.checkpoint} is not one")
    if is_hf_folder(args.checkpoint):  # transformers save_pretrained: config.json + weights
        result = convert_hf_folder(args.checkpoint, args.out)
    else:
        from gptcore.convert.openai import TENSORFLOW_ENV, convert_checkpoint
        from gptcore.entry import set_environ_defaults

        set_environ_defaults(TENSORFLOW_ENV)  # before TensorFlow is imported
        result = convert_checkpoint(args.checkpoint, args.out, show_progress=True)
    print(f"converted {result.parameters:,} parameters ({result.tensors} tensors) -> {args.out}")
    return 0


def _instruction_tuned(path: str) -> bool:
    """Whether the weights file says it was finetuned on the Alpaca prompt (gptcore.prompt)."""
    from gptcore.prompt import PROMPT_FORMAT, PROMPT_FORMAT_KEY
    from gptcore.weights import read_metadata

    return read_metadata(path).get(PROMPT_FORMAT_KEY) == PROMPT_FORMAT


def _export(args: argparse.Namespace) -> int:
    if args.format == "peft":
        from gptcore.export.peft import export_peft

        result = export_peft(args.model, args.out, args.base, args.base_name)
        print(f"exported a {result.task_type} LoRA adapter ({result.tensors} tensors) -> {args.out}")
        return 0
    if args.base is not None or args.base_name is not None:
        raise GptcoreError("--base and --base-name: only with --format peft")
    if args.chat_template is None or args.modelfile is None:  # unset: an instruction model gets them, a base one not
        tuned = _instruction_tuned(args.model)
        args.chat_template = tuned if args.chat_template is None else args.chat_template
        args.modelfile = tuned if args.modelfile is None else args.modelfile
    if args.format == "hf":
        from gptcore.export.hf import export_hf

        if args.dtype not in (None, "f32"):
            raise GptcoreError(f"--dtype {args.dtype}: the Hugging Face export is float32 only")
        result = export_hf(args.model, args.out, chat_template=args.chat_template)
        print(f"exported {result.architecture} ({result.tensors} tensors) -> {args.out}")
        return 0
    from gptcore.export.gguf import DTYPES, export_gguf, write_modelfile
    from gptcore.params.schema import ExportParams

    args.dtype = args.dtype or ExportParams.model_fields["dtype"].default  # the export stage's default
    if args.dtype not in DTYPES:  # checked before any work (choices would print argparse's usage instead)
        raise GptcoreError(f"unknown --dtype {args.dtype!r}; choose one of {', '.join(DTYPES)}")
    result = export_gguf(args.model, args.out, dtype=args.dtype, chat_template=args.chat_template)
    print(f"exported GGUF {result.dtype} ({result.tensors} tensors, {result.bytes:,} bytes) -> {args.out}")
    if args.modelfile:
        path = write_modelfile(args.out, result.config.context_length)
        print(f"wrote {path}; then: ollama create NAME -f {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from gptcore.device import resolve_device
    from gptcore.inference.decoding import generate, ids_to_text, make_generator, text_to_ids
    from gptcore.llm import load_for_decoding
    from gptcore.precision import autocast
    from gptcore.tokenizer import EOT_ID, get_tokenizer

    sampling = sampling_from_flags(args)  # checked before the model loads, as the prompt is
    device = resolve_device(args.device)
    tokenizer = get_tokenizer()
    idx = text_to_ids(args.prompt, tokenizer, device)
    if idx.shape[1] == 0:
        raise GptcoreError("the prompt is empty: generation needs at least one token")
    model, precision = load_for_decoding(args.model, args.adapter, device, args.precision, args.quantize)
    with autocast(device, precision):
        out = generate(
            model,
            idx,
            args.max_new_tokens,
            eos_id=EOT_ID,
            generator=make_generator(args.seed, device),
            sampling=sampling,
        )
    print(ids_to_text(out, tokenizer))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from gptcore.chat import chat_in_terminal

    return chat_in_terminal(args)


def _classify(args: argparse.Namespace) -> int:
    from gptcore.device import resolve_device
    from gptcore.recipes.classifier import classify_texts, load_classifier
    from gptcore.recipes.merge import load_with_adapter
    from gptcore.tokenizer import get_tokenizer

    device = resolve_device(args.device)
    if args.adapter is None:
        model, info = load_classifier(args.model, device=device)
    else:
        model, info = load_with_adapter(args.model, args.adapter, device)
        if info is None:
            raise GptcoreError(f"{args.adapter}: is a language model's adapter, not a classifier's")
    for label, probability in classify_texts(model, info, get_tokenizer(), args.texts):
        print(f"{label} {probability:.3f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gptcore.serve import LoadOptions, serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        device=args.device,
        max_predict=args.max_predict,
        origins=[o for o in (args.origins or "").split(",") if o.strip()],
        strict_options=args.strict_options,
        load=LoadOptions(
            precision=args.precision, quantize=args.quantize, adapter=args.adapter, keep_alive=args.keep_alive
        ),
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from gptcore.recipes.merge import merge_adapter

    kind = merge_adapter(args.base, args.adapter, args.out)
    print(f"merged {args.adapter} into {args.base} -> {args.out} ({kind})")
    return 0


def _add_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter",
        default=None,
        help="a LoRA adapter file (adapter.safetensors of a finetuning stage) applied to --model at load time; "
        "refused unless --model is the weights file it was trained on",
    )


def _bench(args: argparse.Namespace) -> int:
    from gptcore.bench.cli import run_tasks

    for text in run_tasks(args):
        print(text, flush=True)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from gptcore.doctor import diagnose

    findings = diagnose(args.params, args.dvc_yaml, args.targets)
    for finding in findings:
        print(finding.line(), flush=True)
    failed = sum(f.status == "fail" for f in findings)
    print(f"{failed} problem(s)" if failed else "ready: nothing in the way of the plan")
    return 1 if failed else 0


def _add_decoding_precision(p: argparse.ArgumentParser) -> None:
    from gptcore.params.choices import PRECISIONS, QUANTIZE  # not gptcore.precision: --help imports no torch

    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="fp32 (exact); bf16-true (bf16 weights, fp32 logits: faster on CPUs/GPUs with native "
        "bf16); bf16-mixed/fp16-mixed (autocast); auto (bf16-true where bf16 is native, else fp32)",
    )
    p.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help="int8: int8 weights, activations rounded per 32 as llama.cpp's q8_0 (CPU; faster decoding, some quality cost: docs/performance.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gptcore", description=__doc__)  # help shows defaults, in every verb too
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (and debug log lines)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=-1,
        default=0,
        help="print only warnings and errors on stderr",
    )
    loudness.add_argument(
        "-v", "--verbose", dest="verbosity", action="store_const", const=1, help="print debug lines too"
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    _add_convert(verbs)
    _add_export(verbs)
    _add_generate(verbs)
    _add_chat(verbs)
    _add_classify(verbs)
    _add_serve(verbs)
    _add_merge(verbs)
    _add_bench(verbs)
    _add_doctor(verbs)
    return parser


def _add_convert(verbs) -> None:
    """`gptcore convert`: an OpenAI TensorFlow checkpoint or a Hugging Face folder -> a weights file."""
    p = verbs.add_parser(
        "convert",
        help="convert an OpenAI GPT-2 TensorFlow checkpoint folder, or a Hugging Face "
        "GPT-2 folder, into a weights file; a Hugging Face PEFT LoRA folder into an adapter file",
    )
    p.add_argument(
        "checkpoint",
        metavar="CKPT_DIR",
        help="folder with hparams.json and model.ckpt.* (OpenAI), "
        "config.json and model.safetensors / pytorch_model.bin (HF), or adapter_config.json (PEFT)",
    )
    p.add_argument("out", metavar="OUT", help="weights file (or adapter file, for PEFT) to write (.safetensors)")
    p.add_argument(
        "--base",
        default=None,
        help="for a PEFT adapter folder: the gptcore weights file of its base (needed for one peft itself wrote)",
    )
    p.set_defaults(func=_convert)


def _add_export(verbs) -> None:
    """`gptcore export`: a weights file -> GGUF (+ Modelfile) or a Hugging Face folder."""
    p = verbs.add_parser(
        "export", help="write a weights file as GGUF (+ Ollama Modelfile) or a Hugging Face folder, an adapter as PEFT"
    )
    p.add_argument(
        "--format",
        required=True,
        choices=("gguf", "hf", "peft"),
        help="gguf: llama.cpp / Ollama; hf: transformers; peft: a LoRA adapter file as a Hugging Face PEFT folder",
    )
    p.add_argument("model", metavar="MODEL", help="gptcore weights file (.safetensors), or adapter file for peft")
    p.add_argument("out", metavar="OUT", help="the .gguf file, or the folder for --format hf and peft")
    p.add_argument(
        "--base",
        default=None,
        help="peft: the base weights file the adapter was trained on (checked; a classifier's needs it)",
    )
    p.add_argument(
        "--base-name",
        default=None,
        help="peft: base_model_name_or_path in adapter_config.json, e.g. the folder of `export --format hf BASE`",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="GGUF weights: f32 (exact), f16 (half the size; unset: f16, as the export stage), bf16 (bf16-true's bits), "
        "q8_0 (a quarter); --format hf is f32 only",
    )
    p.add_argument(
        "--modelfile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write an Ollama Modelfile with the Alpaca chat template beside the GGUF (unset: for a model "
        "that the instruction finetuning wrote, as its weights file says; not for a base model)",
    )
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store the Alpaca chat template in the GGUF (tokenizer.chat_template) or the HF tokenizer "
        "config (unset: for a model that the instruction finetuning wrote, as its weights file says)",
    )
    p.set_defaults(func=_export)


def _add_generate(verbs) -> None:
    """`gptcore generate`: continue a prompt."""
    p = verbs.add_parser("generate", help="continue a prompt with a gptcore weights file")
    p.add_argument("--model", required=True, help="weights file (.safetensors)")
    _add_adapter(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    add_sampling_flags(p)
    p.add_argument(
        "--device", type=device_name, default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )
    _add_decoding_precision(p)
    p.set_defaults(func=_generate)


def _add_chat(verbs) -> None:
    """`gptcore chat`: a conversation in the terminal."""
    p = verbs.add_parser(
        "chat",
        help="talk with a language model in the terminal: replies stream as they are decoded; "
        "/help lists the commands (docs/chat.md)",
    )
    p.add_argument("--model", required=True, help="weights file (.safetensors), e.g. models/instruct/model.safetensors")
    _add_adapter(p)
    p.add_argument(
        "--system", default=None, help="the system message, in place of the Alpaca preamble (/system changes it)"
    )
    add_sampling_flags(p, max_new_tokens=256, what=" per reply")
    p.add_argument(
        "--device", type=device_name, default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )
    _add_decoding_precision(p)
    p.set_defaults(func=_chat)


def _add_classify(verbs) -> None:
    """`gptcore classify`: label texts spam or ham."""
    p = verbs.add_parser("classify", help="label texts spam or ham with a classifier weights file")
    p.add_argument(
        "--model",
        required=True,
        help="classifier weights file (models/classifier/model.safetensors), or the foundation with --adapter",
    )
    _add_adapter(p)
    p.add_argument(
        "--device", type=device_name, default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )
    p.add_argument("texts", nargs="+", metavar="TEXT", help="one line of output per text: label and its probability")
    p.set_defaults(func=_classify)


def _add_serve(verbs) -> None:
    """`gptcore serve`: the Ollama/OpenAI-compatible server."""
    p = verbs.add_parser("serve", help="serve a weights file over Ollama's and OpenAI's REST APIs (docs/serving.md)")
    p.add_argument("--model", required=True, help="weights file (.safetensors)")
    _add_adapter(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=integer(0, 65535), default=11434, help="Ollama's port by default; 0 picks a free one")
    p.add_argument("--name", default=None, help="model name clients use (default: the weights file's folder)")
    p.add_argument(
        "--device", type=device_name, default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"
    )
    p.add_argument(
        "--max-predict",
        type=integer(1),
        default=None,
        help="most new tokens per request (default: as many as the context holds)",
    )
    p.add_argument(
        "--keep-alive",
        default=None,
        help="how long the model stays loaded once idle when a request names no keep_alive: a duration "
        "(5m, 1h30m, seconds; negative: forever); default $OLLAMA_KEEP_ALIVE, else 5m, as Ollama",
    )
    p.add_argument(
        "--origins",
        default=None,
        help="more web origins allowed to call the API, comma-separated, * as wildcard "
        "(added to localhost's and to OLLAMA_ORIGINS)",
    )
    p.add_argument(
        "--strict-options",
        action="store_true",
        help="refuse (400) request fields and options gptcore does not use; default: serve the request and "
        "name them in a Warning header, as Ollama ignores them",
    )
    _add_decoding_precision(p)
    p.set_defaults(func=_serve)


def _add_merge(verbs) -> None:
    """`gptcore merge`: a base weights file + a LoRA adapter file -> one weights file."""
    p = verbs.add_parser("merge", help="merge a LoRA adapter file into the base weights file it was trained on")
    p.add_argument("base", metavar="BASE", help="the base weights file (the stage's foundation)")
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter file (adapter.safetensors)")
    p.add_argument("out", metavar="OUT", help="the merged weights file to write (.safetensors)")
    p.set_defaults(func=_merge)


def _add_bench(verbs) -> None:
    """`gptcore bench`: speed and memory beside the peers."""
    p = verbs.add_parser("bench", help="tokens/s and peak memory of gptcore beside Hugging Face transformers")
    from gptcore.bench.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=_bench)


def _add_doctor(verbs) -> None:
    """`gptcore doctor`: what the current params need, checked in seconds, one line each with its fix."""
    p = verbs.add_parser(
        "doctor",
        help="check what params.yaml needs before a long run (downloads or mirror files, disk, judge server, "
        "C compiler, torch): one line each, with the fix; exit 1 on a problem",
    )
    p.add_argument(
        "targets",
        nargs="*",
        metavar="STAGE",
        help="the stages you will run, as for `dvc repro STAGE...` (with what they need upstream); none: every stage",
    )
    p.add_argument("--params", default="params.yaml", help="the params file to check")
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="the pipeline whose stages make the plan")
    p.set_defaults(func=_doctor)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry(lambda: args.func(args), debug=args.debug, verbosity=args.verbosity)
