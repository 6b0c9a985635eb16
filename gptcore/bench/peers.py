"""The peers' side of `gptcore bench`: Hugging Face transformers' GPT-2 and llama.cpp (llama-cpp-python) running
the same task on the same shapes, each in its own worker process (gptcore/bench/worker.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from gptcore.bench.spec import BenchSpec, model_config


def hf_task(spec: BenchSpec, device, bf16: bool):
    """A zero-argument callable that runs the task once on transformers' GPT2LMHeadModel."""
    import torch

    config = model_config(spec)
    model = _hf_model(spec, device, config)
    generator = torch.Generator().manual_seed(spec.seed)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    if spec.task in ("train", "classify"):
        return _hf_training_task(spec, device, model, config, generator, amp)
    return _hf_decoding_task(spec, device, model, config, generator, amp)


def _hf_model(spec: BenchSpec, device, config):
    """GPT2LMHeadModel with gptcore's config and random weights, on the device."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcore.device import forked_rng

    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.emb_dim,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        resid_pdrop=config.drop_rate,
        embd_pdrop=config.drop_rate,
        attn_pdrop=config.drop_rate,
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
        tie_word_embeddings=config.tie_embeddings,
        use_cache=spec.task.startswith("generate"),
    )
    with forked_rng(device, spec.seed), torch.device(device):
        return GPT2LMHeadModel(hf_config)


def _hf_training_task(spec: BenchSpec, device, model, config, generator, amp):
    """One AdamW step: the whole model on next tokens (train), or its last block and a 2-class head (classify)."""
    import torch
    import torch.nn.functional as F

    ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq_len + 1), generator=generator).to(device)
    inputs = ids[:, :-1]
    if spec.task == "classify":
        with torch.device(device):
            model.lm_head = torch.nn.Linear(config.emb_dim, 2)
        model.requires_grad_(False)
        for module in (model.transformer.h[-1], model.transformer.ln_f, model.lm_head):
            module.requires_grad_(True)
        targets = torch.randint(0, 2, (spec.batch,), generator=generator).to(device)
    else:
        targets = ids[:, 1:]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.1)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with amp():
            logits = model(input_ids=inputs, use_cache=False).logits
            if spec.task == "classify":
                logits = logits[:, -1]
            loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())
        loss.backward()
        optimizer.step()

    return step


def _hf_decoding_task(spec: BenchSpec, device, model, config, generator, amp):
    """Greedy generate() of exactly new_tokens tokens after random prompts."""
    import torch

    model.eval()
    prompts = torch.randint(0, config.vocab_size, (spec.batch, spec.prompt_len), generator=generator).to(device)
    mask = torch.ones_like(prompts)

    def run():
        with torch.inference_mode(), amp():
            model.generate(
                prompts,
                attention_mask=mask,
                max_new_tokens=spec.new_tokens,
                min_new_tokens=spec.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def llama_cpp_task(spec: BenchSpec, folder: Path, gguf_dtype: str):
    """The same random weights (or weights file) as gptcore's worker, exported to GGUF and run by
    llama.cpp: greedy decoding of new_tokens tokens after the same prompt."""
    import llama_cpp
    import torch

    from gptcore.config import PRESETS
    from gptcore.device import forked_rng
    from gptcore.export.gguf import export_gguf
    from gptcore.model import GPTModel
    from gptcore.weights import save_model

    config = model_config(spec)
    source = Path(spec.model)
    if spec.model in PRESETS:
        with forked_rng(torch.device("cpu"), spec.seed):
            model = GPTModel(config)
        source = folder / "model.safetensors"
        save_model(model, source)
        del model
    export_gguf(source, folder / "model.gguf", dtype=gguf_dtype, chat_template=False)
    threads = spec.threads or torch.get_num_threads()
    llm = llama_cpp.Llama(
        model_path=str(folder / "model.gguf"),
        n_ctx=spec.prompt_len + spec.new_tokens,
        n_batch=spec.prompt_len,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    generator = torch.Generator().manual_seed(spec.seed)
    prompt = torch.randint(0, config.vocab_size, (1, spec.prompt_len), generator=generator)[0].tolist()

    def run():
        made = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            made += 1
            if made == spec.new_tokens:
                break

    return run
