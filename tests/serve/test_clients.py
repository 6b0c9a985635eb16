"""The clients people use with Ollama and OpenAI, each driven against a real `gptcore serve` by the scripts in
tests/clients/ (docs/serving.md, "Clients verified").

The Python clients run under GPTCORE_CLIENTS_PYTHON (default: this interpreter), so the heavy ones
(LangChain, LlamaIndex, LiteLLM) can live in a venv of their own; a client not installed there is skipped
with the reason. The JavaScript client needs `node` and `npm ci` in tests/clients. CI installs only
`.[dev]`: there the `ollama` and `openai` runs check the harness itself, and the others skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

CLIENTS_DIR = REPO / "tests" / "clients"
CLIENTS_PYTHON = os.environ.get("GPTCORE_CLIENTS_PYTHON", sys.executable)
PYTHON_CLIENTS = ["ollama", "openai", "langchain", "llamaindex", "litellm"]
SKIPPED = 3  # verify_python_clients.py's exit status when the client is not installed


def _serve_tiny():
    spec = importlib.util.spec_from_file_location("serve_tiny", CLIENTS_DIR / "serve_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def url(tmp_path_factory, mirror_dir):
    from gptcore.serve import Server

    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    path = _serve_tiny().write_tiny_model(tmp_path_factory.mktemp("clients") / "tiny.safetensors")
    server = Server(path, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True).start()
    yield server.url
    server.close()


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.parametrize("client", PYTHON_CLIENTS)
def test_python_client(client, url):
    result = run([CLIENTS_PYTHON, str(CLIENTS_DIR / "verify_python_clients.py"), "--url", url, "--only", client])
    if result.returncode == SKIPPED:
        pytest.skip(f"{result.stdout.strip()} under {CLIENTS_PYTHON} (set GPTCORE_CLIENTS_PYTHON; docs/serving.md)")
    lines = result.stdout.splitlines()
    assert result.returncode == 0, (
        "\n".join(line for line in lines if not line.startswith("ok ")) + result.stderr[-2000:]
    )
    assert sum(line.startswith(f"ok {client} ") for line in lines) >= 10, result.stdout


def test_ollama_js(url):
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (CLIENTS_DIR / "node_modules" / "ollama" / "package.json").is_file():
        pytest.skip("the ollama npm package is not installed: (cd tests/clients && npm ci)")
    result = run(["node", str(CLIENTS_DIR / "verify_ollama_js.mjs"), url, "tiny"])
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.count("\nok ") >= 15 and "all checks passed" in result.stdout, result.stdout
