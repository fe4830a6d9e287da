"""The real ComfyUI server (its own main.py) as a subprocess on a loopback port, for end-to-end tests.

`ComfyServer` lays out a private base directory (custom_nodes/ holding only a link to this pack, the tiny
checkpoint in models/checkpoints, empty input/output/user/temp), starts
`python main.py --cpu --listen 127.0.0.1 --port <free port> --base-directory <dir> ...`, waits for
/system_stats and always stops it again (SIGTERM to its process group, SIGKILL after a grace period). It
also dies with the test process (PR_SET_PDEATHSIG) and after a hard lifetime, so a hung test cannot
leave a server behind. Everything it talks to is 127.0.0.1.

Used by tests/test_server.py (prompts through /prompt, /history, /interrupt) and tests/test_editor.py
(the editor in headless Chromium).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = "tiny_sd15.safetensors"
LOOPBACK = "127.0.0.1"
# Same thread count in every server a test compares (CPU results can depend on how work is split).
SERVER_THREADS = str(max(1, min(4, os.cpu_count() or 1)))

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the tiny checkpoint, once per session

def tiny_checkpoint_file(tmp_path_factory) -> Path:
    """support/tiny_checkpoint.py's random SD1.5-format checkpoint, written once per test session (~10 s)."""
    path = tmp_path_factory.getbasetemp() / "tiny_checkpoint" / CHECKPOINT_NAME
    if not path.is_file():
        from support.tiny_checkpoint import write_tiny_checkpoint  # needs the booted host
        started = time.monotonic()
        write_tiny_checkpoint(path, seed=0)
        log.info("tiny checkpoint written in %.1f s: %s", time.monotonic() - started, path)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


try:
    _LIBC = ctypes.CDLL(None)  # loaded here: the child may only make the call, not load a library
except OSError:
    _LIBC = None


def _die_with_parent():  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the server goes when the test process goes


class ServerError(AssertionError):
    pass


class ComfyServer:
    """One ComfyUI server process over its own base directory. Use as a context manager."""

    def __init__(self, host: Path, base_dir: Path, checkpoint: Path | None = None, *, extra_args=(),
                 startup_timeout: float = 120.0, lifetime: float = 600.0, grace: float = 10.0):
        self.host, self.base = Path(host), Path(base_dir)
        self.checkpoint = checkpoint
        self.extra_args = list(extra_args)
        self.startup_timeout, self.lifetime, self.grace = startup_timeout, lifetime, grace
        self.port = None
        self.process = None
        self._killer = None
        self.log_path = self.base / "server.log"

    # ------------------------------------------------------------ layout
    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def layout(self) -> None:
        """custom_nodes/ with only this pack (a link), the checkpoint, empty input/output/user/temp."""
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        pack = self.base / "custom_nodes" / "perfusion"
        if not pack.exists():
            pack.symlink_to(REPO, target_is_directory=True)
        if self.checkpoint is not None:
            target = self.models / "checkpoints" / CHECKPOINT_NAME
            if not target.exists():
                try:
                    os.link(self.checkpoint, target)  # same bytes, no copy
                except OSError:
                    target.symlink_to(self.checkpoint)

    # ------------------------------------------------------------ process
    def command(self) -> list[str]:
        return [sys.executable, str(self.host / "main.py"), "--cpu", "--listen", LOOPBACK, "--port", str(self.port),
                "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base),
                "--database-url", "sqlite:///:memory:", "--preview-method", "none", *self.extra_args]

    def start(self) -> "ComfyServer":
        self.layout()
        env = {**os.environ, "OMP_NUM_THREADS": SERVER_THREADS, "MKL_NUM_THREADS": SERVER_THREADS,
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK, "PYTHONUNBUFFERED": "1"}
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port = free_port()
            with open(self.log_path, "ab") as out:
                self.process = subprocess.Popen(self.command(), cwd=self.host, env=env, stdin=subprocess.DEVNULL,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=_die_with_parent)
            self._killer = threading.Timer(self.lifetime, self._expire)
            self._killer.daemon = True
            self._killer.start()
            started = time.monotonic()
            try:
                while time.monotonic() - started < self.startup_timeout:
                    if self.process.poll() is not None:
                        break
                    with contextlib.suppress(OSError, ServerError):
                        self.get("/system_stats", timeout=2)
                        log.info("ComfyUI up on port %d after %.1f s", self.port, time.monotonic() - started)
                        return self
                    time.sleep(0.25)
            except BaseException:
                self.stop()
                raise
            exited = self.process.poll() is not None
            self.stop()
            if not (exited and "address already in use" in self.log_tail().lower()):
                break
        raise ServerError(f"ComfyUI did not come up within {self.startup_timeout:.0f} s; log:\n{self.log_tail()}")

    def _expire(self):
        log.error("ComfyUI server reached its lifetime of %.0f s; stopping it", self.lifetime)
        self._signal(signal.SIGKILL)

    def _signal(self, sig) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        if self._killer is not None:
            self._killer.cancel()
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(self.grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    # ------------------------------------------------------------ HTTP
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _request(self, method: str, path: str, data=None, timeout: float = 30.0):
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"} if body else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy: loopback only
        try:
            with opener.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise ServerError(f"{method} {path}: HTTP {error.code}: {error.read().decode(errors='replace')[:4000]}")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, data: dict, timeout: float = 30.0):
        return self._request("POST", path, data, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns its prompt_id. A prompt the server refuses raises with ComfyUI's reasons."""
        payload = {"prompt": prompt, "prompt_id": str(uuid.uuid4())}
        if client_id:
            payload["client_id"] = client_id
        answer = self.post("/prompt", payload)
        if answer.get("node_errors"):
            raise ServerError(f"prompt accepted with node errors: {answer['node_errors']}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_ids, timeout: float) -> dict[str, dict]:
        """Poll /history until every prompt finished (successfully or not); returns their entries."""
        pending, done = list(prompt_ids), {}
        deadline = time.monotonic() + timeout
        while pending:
            for prompt_id in list(pending):
                entry = self.history(prompt_id)
                if entry and entry.get("status", {}).get("completed") is not None and \
                        entry["status"].get("status_str") in ("success", "error"):
                    done[prompt_id] = entry
                    pending.remove(prompt_id)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise ServerError(f"prompts {pending} not finished after {timeout:.0f} s; queue "
                                  f"{self.get('/queue')}; log:\n{self.log_tail()}")
            if self.process.poll() is not None:
                raise ServerError(f"the server exited ({self.process.returncode}); log:\n{self.log_tail()}")
            time.sleep(0.2)
        return done

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """Queue one prompt, wait for it and require success; returns its /history entry."""
        prompt_id = self.queue_prompt(prompt)
        entry = self.wait([prompt_id], timeout)[prompt_id]
        require_success(entry, self)
        return entry


def require_success(entry: dict, server: ComfyServer | None = None) -> None:
    status = entry.get("status", {})
    if status.get("status_str") != "success" or not status.get("completed"):
        errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
        raise ServerError(f"prompt did not succeed: {status.get('status_str')}: {errors}"
                          + (f"\nlog:\n{server.log_tail()}" if server else ""))


def output_files(entry: dict) -> list[tuple[str, dict]]:
    """(kind, file record) for every file an entry's output nodes report (images, latents, ...)."""
    found = []
    for node_output in entry.get("outputs", {}).values():
        for kind, items in node_output.items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    found.append((kind, item))
    return found


# ---------------------------------------------------------------- websocket events

class Events:
    """Collects the server's websocket messages for one client id, in a background thread."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self._condition = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._stop = None
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        if not self._connected.wait(30):
            raise ServerError("could not open the websocket")
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._loop.close()

    async def _listen(self):
        import aiohttp
        self._stop = asyncio.Event()
        url = f"ws://{LOOPBACK}:{self.server.port}/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.ws_connect(url, heartbeat=30) as ws:
                self._connected.set()
                stopper = asyncio.ensure_future(self._stop.wait())
                while not self._stop.is_set():
                    receiver = asyncio.ensure_future(ws.receive())
                    finished, _ = await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if receiver not in finished:
                        receiver.cancel()
                        break
                    message = receiver.result()
                    if message.type == aiohttp.WSMsgType.TEXT:
                        with self._condition:
                            self.messages.append(json.loads(message.data))
                            self._condition.notify_all()
                    elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                stopper.cancel()

    def wait_for(self, predicate, timeout: float, what: str = "a message") -> dict:
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerError(f"no {what} within {timeout:.0f} s; last messages "
                                      f"{self.messages[-5:]}; log:\n{self.server.log_tail()}")
                self._condition.wait(min(left, 0.5))

    def of(self, prompt_id: str, kind: str | None = None) -> list[dict]:
        with self._condition:
            return [m for m in self.messages if m.get("data", {}).get("prompt_id") == prompt_id
                    and (kind is None or m.get("type") == kind)]
