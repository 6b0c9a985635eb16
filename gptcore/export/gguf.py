"""A gptcore weights file -> one GGUF file for llama.cpp / Ollama, and the Ollama Modelfile beside it.

The GGUF follows llama.cpp's own `gpt2` architecture (llama.cpp `src/models/gpt2.cpp`, which its
`convert_hf_to_gguf.py` targets for Hugging Face GPT-2): a declarative table of (gptcore tensor,
GGUF tensor), no transposes. gptcore keeps nn.Linear weights as [out, in]; GGUF lists dimensions
innermost first, so a numpy array [out, in] is exactly the `{n_embd, 3*n_embd}`-style shape that
llama.cpp asks for, and the fused `att.qkv` is already [q | k | v] with heads contiguous inside
each third, the split that llama.cpp's `build_qkv` makes. Differences that need a rule:
- Stage 1 models have no q/k/v bias, but llama.cpp's gpt2 loader requires `blk.N.attn_qkv.bias`:
  it is written as zeros (adding zero is exact).
- A tied head is not written: llama.cpp falls back to `token_embd.weight` when `output.weight` is
  absent. An untied head (Stage 1) is written as `output.weight`.
- Which tensors a dtype (f16, bf16, q8_0) converts follows convert_hf_to_gguf.py: 1-D tensors (norms, biases) and the
  position embedding stay F32; q8_0 falls back to F16 for a matrix whose rows are not a multiple of
  Q8_0's 32-value block.
The tokenizer is GPT-2's byte-level BPE (encoder.json tokens in id order, vocab.bpe merges),
`<|endoftext|>` as BOS and EOS, and no BOS added (gptcore prompts start without one).

Tensors are read, converted and written one at a time, into a temporary file renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from gptcore.atomic import atomic_path, write_text
from gptcore.config import GPTConfig
from gptcore.errors import ConfigError, WeightsError
from gptcore.export.templates import INSTRUCTION_MARKER, jinja_chat_template, modelfile_template
from gptcore.model import GPTModel
from gptcore.tokenizer import ENDOFTEXT, EOT_ID, find_tokenizer_files
from gptcore.weights import read_config

ARCH = "gpt2"  # llama.cpp's LLM_ARCH_GPT2 name
# gptcore.model builds every LayerNorm with eps=1e-5 (GPT-2's value, as in OpenAI's model.py).
LAYER_NORM_EPS = 1e-5
DTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
GPT2_VOCAB_SIZE = 50257

# (gptcore tensor, GGUF tensor); BLOCK_NAMES repeat per layer as trf_blocks.{i}. -> blk.{i}.
EMBEDDING_NAMES = (
    ("tok_emb.weight", "token_embd.weight"),
    ("pos_emb.weight", "position_embd.weight"),
)
BLOCK_NAMES = (
    ("norm1.weight", "attn_norm.weight"),
    ("norm1.bias", "attn_norm.bias"),
    ("att.qkv.weight", "attn_qkv.weight"),
    ("att.qkv.bias", "attn_qkv.bias"),  # zeros when the model has none (llama.cpp requires it)
    ("att.out_proj.weight", "attn_output.weight"),
    ("att.out_proj.bias", "attn_output.bias"),
    ("norm2.weight", "ffn_norm.weight"),
    ("norm2.bias", "ffn_norm.bias"),
    ("ff.fc.weight", "ffn_up.weight"),
    ("ff.fc.bias", "ffn_up.bias"),
    ("ff.proj.weight", "ffn_down.weight"),
    ("ff.proj.bias", "ffn_down.bias"),
)
FINAL_NAMES = (
    ("final_norm.weight", "output_norm.weight"),
    ("final_norm.bias", "output_norm.bias"),
)
HEAD_NAME = ("out_head.weight", "output.weight")  # untied heads only
# Kept in F32 whatever the dtype (convert_hf_to_gguf.py: llama.cpp reads them as F32).
ALWAYS_F32 = ("position_embd.weight",)


def name_table(config: GPTConfig) -> list[tuple[str, str]]:
    """Every (gptcore tensor, GGUF tensor) of a model with this config, in file order."""
    blocks = [
        (f"trf_blocks.{i}.{source}", f"blk.{i}.{target}")
        for i in range(config.n_layers)
        for source, target in BLOCK_NAMES
    ]
    head = [] if config.tie_embeddings else [HEAD_NAME]
    return [*EMBEDDING_NAMES, *blocks, *FINAL_NAMES, *head]


def tensor_type(name: str, shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
    """The GGML type a GGUF tensor gets under `dtype` (f32, f16, bf16, q8_0): the rule of convert_hf_to_gguf.py."""
    if dtype == "f32" or len(shape) < 2 or name in ALWAYS_F32:
        return gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return gguf.GGMLQuantizationType.F16
    if dtype == "bf16":
        return gguf.GGMLQuantizationType.BF16
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    return gguf.GGMLQuantizationType.Q8_0 if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


FLOAT_TYPES = {gguf.GGMLQuantizationType.F32: np.dtype(np.float32), gguf.GGMLQuantizationType.F16: np.dtype(np.float16)}


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float32 array in the bytes of `qtype` (numpy float32/float16, or uint8 blocks for Q8_0)."""
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` in `qtype` (GGML_QUANT_SIZES: values per block, bytes per block)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


@dataclass(frozen=True)
class GgufExport:
    """What export_gguf wrote."""

    path: Path
    config: GPTConfig
    dtype: str
    tensors: int
    bytes: int


def check_exportable(path: str | os.PathLike, config: GPTConfig) -> None:
    """Raise WeightsError unless llama.cpp's gpt2 architecture can run this model as it is."""
    if config.num_classes is not None:
        raise WeightsError(
            f"{path}: is a classifier ({config.num_classes} classes); GGUF and Ollama run language models only "
            "(export it with --format hf)"
        )
    if config.vocab_size != GPT2_VOCAB_SIZE:
        raise WeightsError(
            f"{path}: has a vocabulary of {config.vocab_size} tokens; the GGUF carries GPT-2's tokenizer "
            f"({GPT2_VOCAB_SIZE} tokens), so only models with that vocabulary export"
        )


def export_gguf(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "f32",
    name: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    chat_template: bool = True,
) -> GgufExport:
    """Write the gptcore weights file `model_path` as a GGUF file `out` (atomically).

    Args:
        dtype: f32 (exact), f16, bf16 (the bits of gptcore's bf16-true weights: gguf-py rounds to
            nearest even, as torch does), or q8_0 (8-bit blocks of 32 with one f16 scale).
        name: `general.name` in the file (default: the output file's stem).
        tokenizer_dir: where encoder.json and vocab.bpe are (default: gptcore.tokenizer's search).
        chat_template: store the Alpaca chat template as `tokenizer.chat_template` (Jinja, read by
            llama.cpp's chat endpoints; gptcore.export.templates), for instruction models.
    Raises:
        ConfigError: an unknown dtype.
        WeightsError: a missing or unreadable file, a classifier, or a vocabulary other than GPT-2's.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model_path, out = Path(model_path), Path(out)
    config = read_config(model_path)
    check_exportable(model_path, config)
    tokens, merges = read_vocabulary(find_tokenizer_files(tokenizer_dir))
    table = name_table(config)

    with safe_open(str(model_path), framework="numpy") as source, atomic_path(out) as tmp:
        stored = set(source.keys())
        shapes = {}
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in GPTModel(config).state_dict().items()}
        for ours, theirs in table:
            if ours in stored:
                shapes[theirs] = tuple(source.get_slice(ours).get_shape())
                if shapes[theirs] != expected[ours]:
                    raise WeightsError(
                        f"{model_path}: tensor {ours} has shape {shapes[theirs]}, expected {expected[ours]}"
                    )
            elif ours.endswith("att.qkv.bias") and not config.qkv_bias:
                shapes[theirs] = (3 * config.emb_dim,)
            else:
                raise WeightsError(f"{model_path}: tensor {ours} missing")
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_metadata(writer, config, dtype, name or out.stem, tokens, merges)
            if chat_template:
                writer.add_chat_template(jinja_chat_template())
            for _, theirs in table:  # the header lists every tensor before any data is written
                shape, qtype = shapes[theirs], tensor_type(theirs, shapes[theirs], dtype)
                if qtype in FLOAT_TYPES:
                    writer.add_tensor_info(theirs, shape, FLOAT_TYPES[qtype], _nbytes(shape, qtype))
                else:  # quantized blocks are written as bytes: [rows, bytes per row]
                    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                    writer.add_tensor_info(
                        theirs, byte_shape, np.dtype(np.uint8), _nbytes(shape, qtype), raw_dtype=qtype
                    )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for ours, theirs in table:
                if ours in stored:
                    array = source.get_tensor(ours).astype(np.float32, copy=False)
                else:
                    array = np.zeros(shapes[theirs], dtype=np.float32)
                writer.write_tensor_data(_encode(array, tensor_type(theirs, shapes[theirs], dtype)))
        finally:
            writer.close()
        size = tmp.stat().st_size
    return GgufExport(path=out, config=config, dtype=dtype, tensors=len(table), bytes=size)


def _add_metadata(
    writer: gguf.GGUFWriter, config: GPTConfig, dtype: str, name: str, tokens: list[str], merges: list[str]
) -> None:
    """The keys llama.cpp's gpt2 loader reads (the set convert_hf_to_gguf.py writes for GPT-2)."""
    writer.add_name(name)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.emb_dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(4 * config.emb_dim)  # gptcore.model.FeedForward: emb_dim -> 4 * emb_dim
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(DTYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")  # llama.cpp: byte-level BPE with merges
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenisation regex
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i == EOT_ID else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def read_vocabulary(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """GPT-2's tokens in id order (encoder.json) and its merges in rank order (vocab.bpe), as llama.cpp
    stores them: byte-level strings, merges as "left right".

    Raises:
        WeightsError: the files do not describe GPT-2's 50,257 tokens with `<|endoftext|>` last.
    """
    folder = Path(folder)
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    tokens = [""] * len(encoder)
    for token, index in encoder.items():
        if not 0 <= index < len(tokens) or tokens[index]:
            raise WeightsError(f"{folder / 'encoder.json'}: token ids are not 0..{len(tokens) - 1}, each once")
        tokens[index] = token
    if len(tokens) != GPT2_VOCAB_SIZE or tokens[EOT_ID] != ENDOFTEXT:
        raise WeightsError(f"{folder / 'encoder.json'}: not GPT-2's vocabulary")
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    # The first line is a "#version: 0.2" comment; the last is empty.
    merges = [line for line in lines[1:] if line]
    return tokens, merges


# --- the Ollama Modelfile ----------------------------------------------------------------------------


def modelfile_text(gguf_name: str, context_length: int) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (a path relative to the Modelfile).

    Stops at `<|endoftext|>` (the EOS the instruction data ends each response with) and at the next
    `### Instruction:` (where a model that missed its EOS would start a turn of its own), and sets the
    context to the model's, which Ollama would otherwise take from its own default.
    """
    template = modelfile_template()
    if '"""' in template:  # a Modelfile string cannot hold its own delimiter
        raise ValueError("the template may not contain three double quotes")
    return (
        f"# Ollama Modelfile for a gptcore instruction model: ollama create NAME -f Modelfile\n"
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{template}"""\n'
        f'PARAMETER stop "{ENDOFTEXT}"\n'
        f'PARAMETER stop "{INSTRUCTION_MARKER}"\n'
        f"PARAMETER num_ctx {context_length}\n"
    )


def write_modelfile(gguf_path: str | os.PathLike, context_length: int, out: str | os.PathLike | None = None) -> Path:
    """Write the Modelfile for `gguf_path` (default: `Modelfile` in the GGUF's folder), atomically."""
    gguf_path = Path(gguf_path)
    out = Path(out) if out is not None else gguf_path.with_name("Modelfile")
    relative = os.path.relpath(gguf_path.resolve(), out.resolve().parent)
    write_text(out, modelfile_text(Path(relative).as_posix(), context_length))
    return out
