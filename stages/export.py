"""Stage export: the instruction model (--model, models/instruct/model.safetensors) for other runtimes.

Reads params `export:` (formats, dtype). Writes the folder --out (swapped in whole): `<name>.gguf` and
an Ollama `Modelfile` beside it (format gguf: `ollama create <name> -f <out>/Modelfile`), and `hf/`, a
Hugging Face transformers folder (format hf). See docs/export.md.
"""

from gptcore.arguments import ArgumentParser
from gptcore.atomic import atomic_dir
from gptcore.entry import run_entry
from gptcore.export.gguf import export_gguf, write_modelfile
from gptcore.export.hf import export_hf
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file (validated whole before any work)")
    parser.add_argument("--model", required=True, help="instruction model weights file")
    parser.add_argument("--out", required=True, help="folder to write, e.g. models/export")
    parser.add_argument("--name", required=True, help="the GGUF's file stem and model name, e.g. gptcore-instruct")
    args = parser.parse_args()

    params = load_params(args.params).export
    written = []
    with atomic_dir(args.out) as tmp:
        if "gguf" in params.formats:
            result = export_gguf(args.model, tmp / f"{args.name}.gguf", dtype=params.dtype, name=args.name)
            write_modelfile(result.path, result.config.context_length)
            written += [f"{args.name}.gguf ({params.dtype}, {result.bytes / 2**20:,.1f} MiB)", "Modelfile"]
        if "hf" in params.formats:
            export_hf(args.model, tmp / "hf")
            written.append("hf/")
    print(f"export: {', '.join(written)} -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
