"""Test helpers: OpenAI-layout GPT-2 checkpoints written by TensorFlow itself, from a Hugging Face model.

OpenAI's gpt-2 `src/model.py` builds variables under `model/` (wte, wpe, h{i}/ln_1/{g,b},
h{i}/attn/c_attn/{w,b}, ...) with conv1d weights of shape [1, nx, nf], and saves them with a
tf.compat.v1 Saver; `write_checkpoint` does the same. Hugging Face's Conv1D keeps [nx, nf], so an HF
weight becomes an OpenAI one by adding the leading axis: that mapping (`openai_arrays`) is written from
the two reference implementations, independently of gptcore's name table.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

HF_LAYER = {  # OpenAI name inside model/h{i}/ -> Hugging Face name inside transformer.h.{i}.
    "ln_1/g": "ln_1.weight",
    "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight",
    "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight",
    "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight",
    "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight",
    "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight",
    "mlp/c_proj/b": "mlp.c_proj.bias",
}


def hf_model(hparams: dict, seed: int = 0, scale: float = 0.2):
    """A randomly initialised HF GPT2LMHeadModel (fp32, eval) whose every parameter is drawn at random.

    HF's own init (zero biases, unit LayerNorm gains, 0.02 weights) would leave a small model blind to
    swapped LayerNorms or dropped biases, so biases and gains are random too and weights larger.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=hparams["n_vocab"],
        n_positions=hparams["n_ctx"],
        n_embd=hparams["n_embd"],
        n_head=hparams["n_head"],
        n_layer=hparams["n_layer"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            is_gain = ".ln_" in name and name.endswith(".weight")
            param.copy_(1.0 + noise if is_gain else noise)
    return model.eval()


def openai_arrays(model, n_layer: int) -> dict[str, np.ndarray]:
    """The HF model's weights under OpenAI's variable names and shapes."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    arrays = {
        "model/wte": sd["transformer.wte.weight"],
        "model/wpe": sd["transformer.wpe.weight"],
        "model/ln_f/g": sd["transformer.ln_f.weight"],
        "model/ln_f/b": sd["transformer.ln_f.bias"],
    }
    for i in range(n_layer):
        for openai_name, hf_name in HF_LAYER.items():
            value = sd[f"transformer.h.{i}.{hf_name}"]
            arrays[f"model/h{i}/{openai_name}"] = value[None] if openai_name.endswith("/w") else value
    return arrays


def write_checkpoint(
    folder: Path, hparams: dict, arrays: dict[str, np.ndarray | tuple[int, ...]], vocab_dir: Path | None = None
) -> Path:
    """Write an OpenAI-layout checkpoint folder with TensorFlow's tf.compat.v1 Saver.

    `arrays` maps variable names to values, or to a shape (TensorFlow then draws N(0, 0.02) itself,
    without a numpy copy: how the 774M-shape checkpoint is made). `vocab_dir` adds encoder.json and
    vocab.bpe, as OpenAI's folders hold them.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables = {}
        for name, value in arrays.items():
            shape = value if isinstance(value, tuple) else value.shape
            init = (
                tf.compat.v1.random_normal_initializer(stddev=0.02)
                if isinstance(value, tuple)
                else tf.compat.v1.zeros_initializer()
            )
            variables[name] = tf.compat.v1.get_variable(name, shape=shape, dtype=tf.float32, initializer=init)
        saver = tf.compat.v1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as session:
            for name, value in arrays.items():  # a fed initial value: no 2 GB graph constant
                feed = {} if isinstance(value, tuple) else {variables[name].initial_value: value}
                session.run(variables[name].initializer, feed)
            saver.save(session, str(folder / "model.ckpt"))
    (folder / "hparams.json").write_text(json.dumps(hparams, indent=2))
    if vocab_dir is not None:
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copyfile(vocab_dir / name, folder / name)
    return folder


def openai_shapes(hparams: dict) -> dict[str, tuple[int, ...]]:
    """Every variable of an OpenAI GPT-2 checkpoint with its shape, from hparams.json alone."""
    d, v, c = hparams["n_embd"], hparams["n_vocab"], hparams["n_ctx"]
    layer = {
        "ln_1/g": (d,),
        "ln_1/b": (d,),
        "attn/c_attn/w": (1, d, 3 * d),
        "attn/c_attn/b": (3 * d,),
        "attn/c_proj/w": (1, d, d),
        "attn/c_proj/b": (d,),
        "ln_2/g": (d,),
        "ln_2/b": (d,),
        "mlp/c_fc/w": (1, d, 4 * d),
        "mlp/c_fc/b": (4 * d,),
        "mlp/c_proj/w": (1, 4 * d, d),
        "mlp/c_proj/b": (d,),
    }
    shapes = {"model/wte": (v, d), "model/wpe": (c, d), "model/ln_f/g": (d,), "model/ln_f/b": (d,)}
    for i in range(hparams["n_layer"]):
        shapes.update({f"model/h{i}/{k}": s for k, s in layer.items()})
    return shapes
