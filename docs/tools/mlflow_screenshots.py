"""The MLflow UI screenshots of docs/mlflow.md, taken by headless Chromium from a real sweep.

    python docs/tools/mlflow_screenshots.py [--store DIR] [--chromium chromium]

Runs ``python run.py -m seed=0,1 loss=none,pi_pa trainer=smoke`` into ``DIR`` (a temporary folder
by default; an existing store there is reused), serves the store with ``mlflow ui``, and writes
``docs/figures/mlflow_runs.png`` (the runs table: the sweep's parent run unfolded),
``mlflow_run.png`` (a nested run's overview) and ``mlflow_sweep.png`` (the parent's overview).
Needs Debian's ``chromium`` (``apt-get install chromium``); the sweep takes a few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
SIZE = "1500,1500"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep(store: Path) -> str:
    """The smoke sweep's tracking URI (run once per store folder)."""
    uri = f"sqlite:///{store}/mlflow.db"
    if not (store / "multirun" / "summary.md").is_file():
        subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "seed=0,1", "loss=none,pi_pa", "trainer=smoke",
                        f"logger.tracking_uri={uri}", f"hydra.sweep.dir={store}/multirun"], cwd=store, check=True)
    return uri


def shoot(chromium: str, url: str, out: Path) -> None:
    """One screenshot of ``url`` after the page's scripts settled (virtual time)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={SIZE}", "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"{out.relative_to(ROOT)} <- {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="folder for the sweep and its store (default: a temporary one)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    store = Path(args.store or tempfile.mkdtemp(prefix="kdseg-screenshots-")).resolve()
    store.mkdir(parents=True, exist_ok=True)
    uri = sweep(store)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdseg").experiment_id
    (parent,) = client.search_runs([exp], "tags.task = 'sweep'", max_results=1)
    child = sorted(client.search_runs([exp], "tags.task = 'distill'"), key=lambda r: r.info.run_name)[-1]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)],
                              cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        FIGURES.mkdir(parents=True, exist_ok=True)
        view = "workflowType=machine_learning"
        shoot(args.chromium, f"{base}/#/experiments/{exp}/runs?{view}&isPreview=false&runsExpanded=%7B%22{parent.info.run_id}%22%3Atrue%7D",
              FIGURES / "mlflow_runs.png")
        shoot(args.chromium, f"{base}/#/experiments/{exp}/runs/{child.info.run_id}?{view}", FIGURES / "mlflow_run.png")
        shoot(args.chromium, f"{base}/#/experiments/{exp}/runs/{parent.info.run_id}?{view}", FIGURES / "mlflow_sweep.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
