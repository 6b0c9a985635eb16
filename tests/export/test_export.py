"""`gptcore export --format gguf`: the file's layout, llama.cpp running it, and the Ollama Modelfile.

llama.cpp itself (llama-cpp-python, a dev dependency) loads the exported GGUF of small random and
small trained models (with and without q/k/v bias, tied and untied heads, an odd head count, a short
context) and must give our fp32 logits within 1e-3 and our greedy tokens. The Modelfile's TEMPLATE
is rendered with a Go-template renderer (tests/gotemplate.py) on the values Ollama passes it, and
must give the exact prompt the instruction stage trains on.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch

from gptcore.cli import build_parser, main
from gptcore.config import GPTConfig
from gptcore.export.gguf import export_gguf, modelfile_text, name_table, tensor_type
from gptcore.export.templates import modelfile_template
from gptcore.inference.decoding import generate
from gptcore.model import random_model
from gptcore.prompt import PREAMBLE, RESPONSE_MARKER, format_input
from gptcore.serve.chat import render_chat
from gptcore.tokenizer import EOT_ID, encode
from gptcore.weights import load_model, load_state, save_model
from tests.gotemplate import render
from tests.test_tokenizer import TEXTS

PROMPTS = ["Every effort moves you", "I had always thought Jack", "The quick brown fox jumps"]

# name -> (config, trained?): GPT-2's layout (q/k/v bias, tied head); Stage 1's (neither); an odd head
# count with a short context, where the prompt plus the new tokens fill the whole context.
MODELS = {
    "gpt2_random": (
        GPTConfig(context_length=32, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True, tie_embeddings=True),
        False,
    ),
    "stage1_trained": (
        GPTConfig(
            context_length=32, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=False, tie_embeddings=False, drop_rate=0.1
        ),
        True,
    ),
    "odd_heads_short_ctx_trained": (
        GPTConfig(context_length=12, emb_dim=48, n_heads=3, n_layers=2, qkv_bias=True, tie_embeddings=False),
        True,
    ),
}


def _train(model, ids: torch.Tensor, steps: int = 20) -> None:
    """A few AdamW steps of next-token prediction on `ids`, so that the logits have the clear maxima of a
    trained model. The embeddings and the head stay frozen: they dominate the cost on a 50,257-token
    vocabulary and a trained body is enough for that."""
    ctx = model.config.context_length
    for param in (model.tok_emb.weight, model.out_head.weight):
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - ctx - 1, (4,), generator=generator)
        x = torch.stack([ids[s : s + ctx] for s in starts])
        y = torch.stack([ids[s + 1 : s + ctx + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, mirror_dir, tokenizer):
    """name -> weights file; trained ones learned a few steps of The Verdict."""
    root = tmp_path_factory.mktemp("gguf-models")
    ids = torch.tensor(encode(tokenizer, (mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")))
    made = {}
    for seed, (name, (config, trained)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = random_model(config, init="gpt2")  # GPT-2's scale: logits of a few units, as real models
        if trained:
            _train(model, ids)
        else:
            with torch.no_grad():  # GPT-2's init leaves biases 0 and gains 1: draw them, so a dropped one shows
                for param in model.parameters():
                    if param.ndim == 1:
                        param.add_(torch.randn_like(param) * 0.1)
        save_model(model, root / f"{name}.safetensors")
        made[name] = root / f"{name}.safetensors"
    return made


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    """(model name, dtype) -> GGUF file, exported once."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, path in models.items():
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            out[name, dtype] = export_gguf(path, root / f"{name}-{dtype}.gguf", dtype=dtype).path
    return out


# --- the file, read back with gguf's own reader --------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2_random", "stage1_trained"])  # GGUFReader is slow: two layouts cover both
def test_layout_and_metadata(name, models, ggufs):
    config, state = load_state(models[name])
    reader = gguf.GGUFReader(ggufs[name, "f32"])
    table = name_table(config)
    assert [t.name for t in reader.tensors] == [theirs for _, theirs in table]
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not config.tie_embeddings)

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "gpt2"
    assert field("gpt2.context_length") == config.context_length
    assert field("gpt2.embedding_length") == config.emb_dim
    assert field("gpt2.block_count") == config.n_layers
    assert field("gpt2.feed_forward_length") == 4 * config.emb_dim
    assert field("gpt2.attention.head_count") == config.n_heads
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.bos_token_id") == EOT_ID == field("tokenizer.ggml.eos_token_id")
    assert field("tokenizer.ggml.add_bos_token") is False
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[EOT_ID] == "<|endoftext|>" and tokens[31373] == "hello"
    assert field("tokenizer.ggml.merges")[0] == "Ġ t" and len(field("tokenizer.ggml.merges")) == 50000

    for (ours, theirs), tensor in zip(table, reader.tensors):
        data = np.asarray(tensor.data).reshape(tuple(reversed(tensor.shape.tolist())))
        expected = state[ours].numpy() if ours in state else np.zeros(3 * config.emb_dim, np.float32)
        assert ours in state or not config.qkv_bias  # only a missing q/k/v bias is made up (as zeros)
        np.testing.assert_array_equal(data, expected, err_msg=theirs)


def test_types_per_dtype(ggufs):
    reader = gguf.GGUFReader(ggufs["odd_heads_short_ctx_trained", "q8_0"])  # emb 48: not a multiple of 32
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in reader.tensors}
    F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    assert types["position_embd.weight"] == types["blk.0.attn_norm.bias"] == F32
    assert types["token_embd.weight"] == F16  # rows of 48 cannot be Q8_0: F16, as convert_hf_to_gguf.py falls back
    assert types["blk.0.ffn_down.weight"] == Q8_0  # rows of 4 * 48 = 192
    BF16 = gguf.GGMLQuantizationType.BF16
    dtypes = ("f32", "f16", "bf16", "q8_0")
    assert [tensor_type("blk.0.attn_qkv.weight", (192, 64), d) for d in dtypes] == [F32, F16, BF16, Q8_0]
    assert [tensor_type("blk.0.attn_qkv.bias", (192,), d) for d in dtypes] == [F32, F32, F32, F32]


def test_bf16_holds_the_bits_of_bf16_true(models, ggufs):
    """A BF16 GGUF matrix is torch's round-to-nearest-even bfloat16 of the weight, bit for bit: llama.cpp
    BF16 multiplies the same weights as gptcore's bf16-true (the like-for-like decoding peer)."""
    config, state = load_state(models["stage1_trained"])
    reader = gguf.GGUFReader(ggufs["stage1_trained", "bf16"])
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    tensors = {t.name: t for t in reader.tensors}
    for ours, theirs in name_table(config):
        tensor = tensors[theirs]
        if tensor.tensor_type != gguf.GGMLQuantizationType.BF16:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, theirs  # 1-D, or the position embedding
            assert ours not in state or state[ours].dim() == 1 or ours == "pos_emb.weight", theirs
            continue
        stored = np.asarray(tensor.data).view(np.uint16).reshape(state[ours].shape)
        expected = state[ours].bfloat16().view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(stored, expected, err_msg=theirs)


# --- llama.cpp runs it ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    """llama.cpp's Python binding; every test that asks for it is marked llama_cpp (conftest.py)."""
    reason = "llama-cpp-python is not installed: pip install -c constraints.txt -e '.[llama]' (compiles llama.cpp)"
    return pytest.importorskip("llama_cpp", reason=reason)


def _llama(llama_cpp, path, n_ctx: int, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_threads_batch=2, verbose=False, **kwargs)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [T, vocab] of every position of ids (one batch, from an empty cache)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def logit_diffs(llama_cpp, model_path, gguf_path, tokenizer) -> float:
    """Max |logit difference| between gptcore (fp32) and llama.cpp over every position of PROMPTS."""
    ours = load_model(model_path)
    llm = _llama(llama_cpp, gguf_path, ours.config.context_length, logits_all=True)
    worst = 0.0
    for prompt in PROMPTS:
        ids = encode(tokenizer, prompt)[: ours.config.context_length]
        with torch.no_grad():
            mine = ours(torch.tensor([ids]))[0].numpy()  # [T, vocab]
        worst = max(worst, float(np.abs(_llama_logits(llm, ids) - mine).max()))
    return worst


@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_logits_equal_ours_in_f32(name, models, ggufs, tokenizer, llama_cpp):
    diff = logit_diffs(llama_cpp, models[name], ggufs[name, "f32"], tokenizer)
    print(f"{name} f32: max |logit diff| {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_greedy_tokens_equal_gptcore_generate(name, models, ggufs, tokenizer, llama_cpp):
    ours = load_model(models[name])
    ctx = ours.config.context_length
    llm = _llama(llama_cpp, ggufs[name, "f32"], ctx)
    for prompt in PROMPTS:
        ids = encode(tokenizer, prompt)
        new = min(ctx - len(ids), 16)  # the short-context model fills its context (llama.cpp slides no window)
        mine = generate(ours, torch.tensor([ids]), new, eos_id=EOT_ID)[0, len(ids) :].tolist()
        theirs = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token == EOT_ID or len(theirs) == new:
                break
            theirs.append(token)
        assert theirs == mine, prompt
        assert len(mine) == new or mine[-1:] != [EOT_ID]


def test_llama_cpp_tokenizes_like_tiktoken(ggufs, tokenizer, llama_cpp):
    llm = _llama(llama_cpp, ggufs["gpt2_random", "f32"], 32, vocab_only=True)
    for text in TEXTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert ids == encode(tokenizer, text), text
        assert llm.tokenize(text.encode("utf-8"), add_bos=False) == tokenizer.encode_ordinary(text), text
        assert llm.detokenize(ids, special=True).decode("utf-8") == text


@pytest.mark.parametrize("dtype, bound", [("f16", 5e-3), ("bf16", 1e-2), ("q8_0", 5e-2)])
def test_llama_cpp_agreement_of_smaller_dtypes(dtype, bound, models, ggufs, tokenizer, llama_cpp):
    """Rounded weights move the logits; the figures are reported in docs/export.md."""
    for name in MODELS:
        diff = logit_diffs(llama_cpp, models[name], ggufs[name, dtype], tokenizer)
        print(f"{name} {dtype}: max |logit diff| {diff:.2e}")
        assert diff < bound, name


# --- the Ollama Modelfile --------------------------------------------------------------------------------


def ollama_values(messages: list[dict]) -> dict:
    """What Ollama passes a template that names .Messages (server/template: collate): all system
    messages joined by a blank line as .System, consecutive messages of one role merged the same way."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": system, "Messages": collated, "Response": ""}


def _template_of(modelfile: str) -> str:
    match = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.DOTALL | re.MULTILINE)
    assert match, modelfile
    return match.group(1)


ENTRIES = [
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.", "output": "-"},
    {"instruction": "Name three primary colours.", "input": "", "output": "-"},
]


def _user_message(entry: dict) -> str:
    """An entry as one chat message: the instruction, then its input under `### Input:` if it has one."""
    return format_input(entry).removeprefix(f"{PREAMBLE}\n\n### Instruction:\n")


@pytest.mark.parametrize("entry", ENTRIES, ids=["with_input", "without_input"])
def test_modelfile_renders_the_training_prompt(entry):
    template = _template_of(modelfile_text("m.gguf", 1024))
    rendered = render(template, ollama_values([{"role": "user", "content": _user_message(entry)}]))
    assert rendered == format_input(entry) + RESPONSE_MARKER  # the exact prompt the instruction stage trains on
    system = "You answer in one word."
    with_system = render(
        template,
        ollama_values([{"role": "system", "content": system}, {"role": "user", "content": _user_message(entry)}]),
    )
    assert with_system == system + (format_input(entry) + RESPONSE_MARKER).removeprefix(PREAMBLE)
    # Runtimes that fill only .System / .Prompt see the same prompt.
    assert render(template, {"System": "", "Prompt": _user_message(entry), "Response": ""}) == rendered


CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    [{"role": "system", "content": "A"}, {"role": "user", "content": "Q"}, {"role": "system", "content": "B"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer starts"}],
    [{"role": "system", "content": "Only a system message"}],
]


@pytest.mark.parametrize("messages", CHATS)
def test_modelfile_renders_chats_as_gptcore_serve(messages):
    """Multi-turn chats render as `gptcore serve`'s /api/chat renders them (gptcore.serve.chat.render_chat)."""
    assert render(modelfile_template(), ollama_values(messages)) == render_chat(messages)


def test_modelfile_text(tmp_path, models, capsys):
    out = tmp_path / "deploy" / "gptcore-instruct.gguf"
    assert main(["export", "--format", "gguf", "--modelfile", str(models["stage1_trained"]), str(out)]) == 0
    modelfile = (tmp_path / "deploy" / "Modelfile").read_text()
    lines = modelfile.splitlines()
    assert "FROM ./gptcore-instruct.gguf" in lines
    assert 'PARAMETER stop "<|endoftext|>"' in lines and 'PARAMETER stop "### Instruction:"' in lines
    assert "PARAMETER num_ctx 32" in lines
    assert "ollama create" in capsys.readouterr().out
    assert (
        main(["export", "--format", "gguf", "--no-modelfile", str(models["gpt2_random"]), str(tmp_path / "b.gguf")])
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "deploy"]


def test_gguf_chat_template_renders_as_gptcore_serve(ggufs, llama_cpp):
    """llama-cpp-python formats chats with the GGUF's tokenizer.chat_template (its Jinja2ChatFormatter,
    add_generation_prompt on, as llama.cpp's chat endpoints): the training prompt for one message,
    render_chat's prompt for every chat."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = _llama(llama_cpp, ggufs["gpt2_random", "f32"], 32, vocab_only=True)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "<|endoftext|>", "<|endoftext|>")
    singles = [[{"role": "user", "content": _user_message(entry)}] for entry in ENTRIES]
    for messages in [*singles, *CHATS]:
        assert formatter(messages=messages).prompt == render_chat(messages), messages
    assert formatter(messages=singles[0]).prompt == format_input(ENTRIES[0]) + RESPONSE_MARKER


def test_the_cli_gives_the_chat_template_to_instruction_models_only(models, tmp_path):
    """Unset, --chat-template and --modelfile follow the weights file: the instruction finetuning marks
    its model (gptcore.prompt.PROMPT_FORMAT_KEY); a base model gets neither."""
    from gptcore.prompt import PROMPT_FORMAT, PROMPT_FORMAT_KEY

    tuned = tmp_path / "instruct.safetensors"
    save_model(load_model(models["gpt2_random"]), tuned, extra={PROMPT_FORMAT_KEY: PROMPT_FORMAT})
    key = b"tokenizer.chat_template"
    for model, expected in ((models["gpt2_random"], False), (tuned, True)):
        out = tmp_path / ("chat" if expected else "base") / "m.gguf"
        assert main(["export", "--format", "gguf", "--dtype", "f32", str(model), str(out)]) == 0
        assert (key in out.read_bytes(), (out.parent / "Modelfile").exists()) == (expected, expected)


def test_no_chat_template_for_a_base_model(models, tmp_path):
    path = export_gguf(models["gpt2_random"], tmp_path / "base.gguf", chat_template=False).path
    with_template = path.with_name("chat.gguf")
    export_gguf(models["gpt2_random"], with_template)
    key = b"tokenizer.chat_template"  # GGUF keys are stored as plain strings in the header
    assert key not in path.read_bytes() and key in with_template.read_bytes()


# --- bad input: one line, nothing written ----------------------------------------------------------------


def _classifier_file(path):
    config = GPTConfig(context_length=16, emb_dim=32, n_heads=2, n_layers=1, num_classes=2)
    save_model(random_model(config), path)


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("classifier", "is a classifier"),
        ("missing", "not found"),
        ("dtype", "unknown --dtype 'q4'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, pattern, tmp_path, models, capsys):
    model = {
        "classifier": tmp_path / "in" / "c.safetensors",
        "missing": tmp_path / "in" / "nope.safetensors",
        "dtype": models["gpt2_random"],
    }[case]
    (tmp_path / "in").mkdir()
    if case == "classifier":
        _classifier_file(model)
    args = ["export", "--format", "gguf", str(model), str(tmp_path / "out" / "m.gguf")]
    assert main(args + (["--dtype", "q4"] if case == "dtype" else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and re.search(pattern, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_is_deterministic(models, ggufs, tmp_path):
    """The same weights give the same bytes (DVC and caches see an unchanged output)."""
    again = tmp_path / "again" / ggufs["stage1_trained", "q8_0"].name
    export_gguf(models["stage1_trained"], again, dtype="q8_0")
    assert again.read_bytes() == ggufs["stage1_trained", "q8_0"].read_bytes()


def test_the_cli_and_the_stage_default_to_the_same_dtype(tmp_path, models, capsys):
    """`gptcore export --format gguf` without --dtype writes what the export stage writes (params' default)."""
    from gptcore.params.schema import ExportParams

    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--no-modelfile", str(models["gpt2_random"]), str(out)]) == 0
    assert f"GGUF {ExportParams().dtype} " in capsys.readouterr().out
    export = next(a for a in build_parser()._actions if a.dest == "verb").choices["export"]
    (dtype,) = [a for a in export._actions if a.dest == "dtype"]
    assert dtype.default is None and "default" not in dtype.help  # said once, by the help formatter's rule
