"""Open WebUI against `gptcore serve`, in a real browser: Open WebUI (its own venv, offline, no login, its
embedding engine on our /api/embed) started against `gptcore serve` with a tiny model, its page driven in
Chromium by Playwright (tests/serve/webui/drive_chat.py, run by that venv's Python), one chat sent with
the default settings (Open WebUI 0.12 sends its built-in tools with it), the streamed reply visible, a
screenshot saved.

Skipped with the reason where something is missing. Set up as docs/serving.md "Open WebUI" says:
    GPTCORE_OPEN_WEBUI=/tmp/owui-venv/bin/open-webui   # pip install "open-webui==0.12.*" playwright there
    GPTCORE_CHROMIUM=/usr/bin/chromium                 # default: chromium on PATH (apt-get install chromium)
    GPTCORE_OPEN_WEBUI_MODEL=models/instruct/model.safetensors   # optional: serve this instead of a tiny model
    GPTCORE_OPEN_WEBUI_SCREENSHOT=docs/images/open-webui.png     # optional: also save the screenshot there
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from gptcore.config import GPTConfig
from gptcore.model import GPTModel
from gptcore.weights import save_model

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).parent / "webui" / "drive_chat.py"
MESSAGE = "Name a primary color."

pytestmark = pytest.mark.slow


def _setup() -> tuple[Path, str, Path]:
    """(open-webui executable, chromium, the Python beside it that has playwright), or a skip saying what is missing."""
    webui = os.environ.get("GPTCORE_OPEN_WEBUI")
    if not webui or not Path(webui).is_file():
        pytest.skip(
            "Open WebUI is not installed: set GPTCORE_OPEN_WEBUI to its open-webui executable (docs/serving.md)"
        )
    chromium = os.environ.get("GPTCORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium or not Path(chromium).is_file():
        pytest.skip("Chromium is not installed (apt-get install chromium) or GPTCORE_CHROMIUM does not name it")
    python = Path(webui).parent / "python"
    check = subprocess.run([str(python), "-c", "import playwright.sync_api"], capture_output=True, timeout=60)
    if check.returncode != 0:
        pytest.skip(f"playwright is not installed beside Open WebUI ({python} -m pip install playwright)")
    return Path(webui), chromium, python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: the process exited ({process.returncode}); its log: {log.read_text()[-1500:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not answer within {seconds:.0f} s; log: {log.read_text()[-1500:]}")


def webui_env(data_dir: Path, ollama_url: str, model: str) -> dict[str, str]:
    """Open WebUI offline against gptcore: no login, no downloads (models, packages), no telemetry, no
    update check, the OpenAI connection off, embeddings (for uploaded files) from our /api/embed."""
    return {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "OLLAMA_BASE_URL": ollama_url,
        "WEBUI_AUTH": "False",
        "WEBUI_SECRET_KEY": "gptcore-test",
        "ENABLE_OPENAI_API": "False",
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SCARF_NO_ANALYTICS": "true",
        "DO_NOT_TRACK": "true",
        "ANONYMIZED_TELEMETRY": "false",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "RAG_EMBEDDING_ENGINE": "ollama",
        "RAG_EMBEDDING_MODEL": model,
        "RAG_OLLAMA_BASE_URL": ollama_url,
        "AUDIO_STT_ENGINE": "webapi",
        "WHISPER_MODEL_AUTO_UPDATE": "False",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
        "RAG_RERANKING_MODEL_AUTO_UPDATE": "False",
        "USER_AGENT": "gptcore-test",
    }


def test_open_webui_chats_in_chromium(tmp_path, mirror_dir):
    webui, chromium, python = _setup()
    weights = os.environ.get("GPTCORE_OPEN_WEBUI_MODEL")
    if weights:
        model_path, name = Path(weights).resolve(), "quickstart"
    else:
        torch.manual_seed(1)
        config = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_heads=4, n_layers=1, qkv_bias=True)
        model_path, name = tmp_path / "tiny.safetensors", "tiny"
        save_model(GPTModel(config), model_path)
    serve_port, webui_port = _free_port(), _free_port()
    serve_log, webui_log = tmp_path / "serve.log", tmp_path / "webui.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPTCORE_MIRROR": str(mirror_dir)}
    serve_cmd = [sys.executable, "-m", "gptcore", "serve", "--model", str(model_path), "--name", name]
    serve_cmd += ["--port", str(serve_port), "--device", "cpu", "--max-predict", "48"]
    processes = []
    try:
        with open(serve_log, "w") as log:
            processes.append(subprocess.Popen(serve_cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        ollama_url = f"http://127.0.0.1:{serve_port}"
        _wait_http(ollama_url + "/api/version", processes[0], 120, serve_log)
        command = [str(webui), "serve", "--host", "127.0.0.1", "--port", str(webui_port)]
        with open(webui_log, "w") as log:
            env = webui_env(tmp_path / "webui-data", ollama_url, f"{name}:latest")
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
        page = f"http://127.0.0.1:{webui_port}"
        _wait_http(page + "/health", processes[1], 300, webui_log)
        screenshot = tmp_path / "open-webui.png"
        drive = [str(python), str(DRIVER), "--url", page, "--model", f"{name}:latest", "--message", MESSAGE]
        drive += ["--chromium", chromium, "--screenshot", str(screenshot), "--timeout", "180"]
        result = subprocess.run(drive, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-1500:] + serve_log.read_text()[-1500:]
        reply = json.loads(result.stdout.splitlines()[-1])["reply"]
        assert reply and "does not support tools" not in reply
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        chats = [line for line in serve_log.read_text().splitlines() if '"POST /api/chat HTTP/1.1" 200' in line]
        assert chats, "the page's chat did not reach gptcore"
        if os.environ.get("GPTCORE_OPEN_WEBUI_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["GPTCORE_OPEN_WEBUI_SCREENSHOT"])
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
