"""Training seconds with synchronous vs background snapshot pushes (--hub_strategy every_save) against the
local Hub test server (tests/hub_server.py) made slow: every commit takes --delay seconds.

    python benchmarks/push_overlap.py [--delay 3] [--steps 6] [--every 2]

Each mode is one tiny training run (a fresh interpreter: Accelerate state is per process); the time is the
run's wall time, start-up and the final push included. Prints one JSON line per mode."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

RUN = """import runpy, sys
import ddpm_hf.hub.upload as upload
upload.TrainingPush.background = {background}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_mode(server, background: bool, args, tmp: Path) -> dict:
    from conftest import TINY_TRAIN  # noqa: E402 (sets the offline, sandboxed environment)

    out = tmp / ("background" if background else "sync")
    cmd = [sys.executable, "-c", RUN.format(background=background), str(REPO / "train_ddpm.py"), *TINY_TRAIN]
    cmd += ["--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.every), "--output_dir", str(out)]
    cmd += ["--push_to_hub", "--hub_strategy", "every_save", "--hub_token", "hf_benchmarkToken0123456789"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp / "hf_home"))
    before = len(server.state.commit_times)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.time() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    commits = [c[2] for c in server.state.commit_times[before:]]
    return dict(mode="background" if background else "synchronous", seconds=round(seconds, 1), commits=commits)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    from hub_server import HubServer

    server = HubServer().start()
    server.state.commit_delay = args.delay
    with tempfile.TemporaryDirectory() as tmp:
        for background in (False, True):
            print(json.dumps(dict(run_mode(server, background, args, Path(tmp)), delay_s=args.delay)), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
