"""Start a throw-away JupyterLab server for the browser test; stop it and its kernels reliably."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers import REPO


@dataclass
class Lab:
    url: str  # http://127.0.0.1:PORT
    token: str
    log: Path

    def api(self, path: str, method: str = "GET") -> object:
        """Call the server's REST API with the token; the parsed JSON (None when empty)."""
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """User settings for a quiet, fully rendered lab: no news or update checks, no windowing
    (cells out of view stay in the DOM, so the test can find the widget's output)."""
    for plugin, values in {
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
    }.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@contextlib.contextmanager
def jupyter_lab(root: Path, state: Path, timeout: float = 90.0) -> Iterator[Lab]:
    """JupyterLab serving `root` on 127.0.0.1 (a free port, a random token), config and runtime
    files under `state`; on exit its kernels are shut down and the server's process group ends."""
    port, token = free_port(), secrets.token_hex(16)
    settings = state / "settings"
    _settings(settings)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={state / 'workspaces'}",
        "--ServerApp.terminals_enabled=False",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    # Kernels import this checkout, whichever msl_kit the environment has installed.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(state / "config"),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    log = state / "jupyterlab.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    lab = Lab(f"http://127.0.0.1:{port}", token, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            with contextlib.suppress(OSError):
                lab.api("/api/status")
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield lab
    finally:
        _stop(proc, lab)


def _stop(proc: subprocess.Popen, lab: Lab) -> None:
    with contextlib.suppress(Exception):  # kernels run in their own sessions: shut them down by API
        for kernel in lab.api("/api/kernels") or []:
            lab.api(f"/api/kernels/{kernel['id']}", method="DELETE")
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the server we started, nothing else
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
