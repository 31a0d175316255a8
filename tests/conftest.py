"""Shared fixtures: the offline data folder (NNSVD_TEST_DATA), a local SLURM cluster, subprocess helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# How long a test waits for a command before calling it hung: a guard, not a measure of speed. The slowest
# command of the suite needs about 5 min on an idle 2-core machine; with other CPU-heavy jobs beside it, 3-5×.
HANG = 1800
# The data the tests read: NNSVD_TEST_DATA (CI sets it), else the folder run.py downloads into (data.root:
# $NNSVD_DATA_ROOT, else ./data in the checkout), laid out as docs/data.md's "Offline" section says.
TEST_DATA = Path(os.environ.get("NNSVD_TEST_DATA") or os.environ.get("NNSVD_DATA_ROOT") or REPO / "data").resolve()


# ------------------------------------------------------------ the checkout stays as it was

_SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def checkout_files(root: Path = REPO) -> dict[str, tuple[int, int]]:
    """Every file of the checkout but the venv, git's and the tools' caches: path → (size, mtime)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP and not d.endswith(".egg-info")]
        for name in files:
            path = Path(directory, name)
            try:
                stat = path.lstat()
            except FileNotFoundError:
                continue
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller, not an xdist worker
        session.config._checkout_before = checkout_files()
    # run.py's default cache.dir is outputs/cache in the checkout: tests that name no cache= use a temporary one
    session.config._test_cache = os.environ["NNSVD_CACHE_DIR"] = tempfile.mkdtemp(prefix="nnsvd-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(getattr(session.config, "_test_cache", ""), ignore_errors=True)
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    after = checkout_files()
    changed = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    written = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    if changed or written or removed:
        lines = [f"  {what} {p}" for what, paths in (("wrote", written), ("changed", changed), ("removed", removed))
                 for p in paths[:20]]
        session.config.get_terminal_writer().line(
            "\nthe tests changed the checkout (a test may write only inside its temporary directories):\n"
            + "\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def require_data(*parts: str) -> Path:
    """Path under the test data folder, or skip the test with the reason."""
    path = TEST_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set NNSVD_TEST_DATA to a data folder laid out as docs/data.md's 'Offline' "
                    "section says (or let run.py download MNIST into ./data)")
    return path


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny matrices: one BLAS/LAPACK thread is fastest, and on a busy 2-core machine
    extra threads spin-wait (a 300×300 SVD goes from 0.02 s to seconds). The setting is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SLURM_SCRIPT = REPO / "scripts" / "local_slurm.sh"


def _slurm_unavailable(reason: str):
    """Skip, or fail where NNSVD_REQUIRE_SLURM=1 (CI) says the SLURM tests must run."""
    if os.environ.get("NNSVD_REQUIRE_SLURM") == "1":
        pytest.fail(f"NNSVD_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> dict[str, str]:
    """A throwaway single-node SLURM cluster (scripts/local_slurm.sh) for the session; yields the
    environment that points commands and sweeps at it ({"SLURM_CONF": ...}), then stops it."""
    import subprocess

    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    if missing:
        _slurm_unavailable(f"SLURM is not installed ({', '.join(missing)} missing): "
                           "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        _slurm_unavailable("the local SLURM cluster needs root (slurmd runs the jobs)")
    directory = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(SLURM_SCRIPT), "start", str(directory)], capture_output=True, text=True,
                           timeout=120)
    if start.returncode != 0:
        _slurm_unavailable(f"the local SLURM cluster did not start: {start.stderr.strip()}")
    conf = start.stdout.strip().removeprefix("export SLURM_CONF=")
    yield {"SLURM_CONF": conf}
    subprocess.run(["bash", str(SLURM_SCRIPT), "stop", str(directory)], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data.root holding a private copy of MNIST (torchvision writes beside the .gz files)
    and links to the read-only WikiText-2 and tokenizer folders."""
    require_data("mnist", "MNIST", "raw")
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(TEST_DATA / "mnist", root / "mnist")
    for name in ("wikitext-2-raw", "gpt2-tokenizer"):
        if (TEST_DATA / name).exists():
            (root / name).symlink_to(TEST_DATA / name)
    return root


def no_network() -> list[str]:
    """A command prefix, ``unshare --net``, that runs the command in a fresh network namespace where
    no host can be reached (skips the test when that is not possible here)."""
    import subprocess

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: cannot make the network unreachable")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --net is not permitted here (needs root or unprivileged user namespaces)")
    return ["unshare", "--net"]


def run_cli(args: list[str], run_dir: Path | None, *, data_root: Path | None = None, cache: Path | None = None,
            env: dict | None = None, check: bool = True, multirun: bool = False, timeout: int = HANG,
            cwd: Path = REPO, prefix: list[str] | None = None):
    """Run ``python run.py ARGS`` as a user would, with its output under run_dir.

    run_dir None: Hydra names the directory itself, under ``cwd``/outputs. ``prefix`` goes before
    the command (e.g. ``["unshare", "--net"]``).
    Returns (completed process, results.json as dict or None).
    """
    import json
    import subprocess
    import sys

    full_env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    full_env.pop("WANDB_API_KEY", None)
    if data_root is not None:
        full_env["NNSVD_DATA_ROOT"] = str(data_root)
    for key, value in (env or {}).items():  # None removes a variable
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    extra = [] if run_dir is None else [f"hydra.sweep.dir={run_dir}"] if multirun else [f"hydra.run.dir={run_dir}"]
    if cache is not None:
        extra.append(f"cache.dir={cache}")
    if not any(a.startswith("wandb.mode=") for a in args):
        extra.append("wandb.mode=disabled")
    cmd = [*(prefix or []), sys.executable, str(REPO / "run.py"), *(["-m"] if multirun else []), *args, *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results_file = None if run_dir is None else run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file and results_file.exists() else None
    return proc, results


def interrupt_and_resume(args: list[str], tmp: Path, marker: str, *, data_root: Path, cache: Path):
    """Run ``run.py ARGS``, send SIGTERM once ``marker`` appears in its log, then resume it.

    Returns (interrupted results, resumed results, uninterrupted results of the same command).
    """
    import json
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp / "interrupted"
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={run_dir}", f"cache.dir={cache}",
           "wandb.mode=disabled"]
    env = {**os.environ, "NNSVD_DATA_ROOT": str(data_root), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run_dir / "run.log"
    deadline = time.time() + HANG
    while time.time() < deadline and not (log.exists() and marker in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # how SLURM preempts a job
    out, _ = proc.communicate(timeout=HANG)
    assert proc.returncode != 0, out
    interrupted = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "interrupted" / "trainer.pt").is_file()
    _, resumed = run_cli([*args, "resume=true"], run_dir, data_root=data_root, cache=cache)
    assert not (run_dir / "interrupted").exists()
    _, straight = run_cli(args, tmp / "straight", data_root=data_root, cache=cache)
    return interrupted, resumed, straight


def wandb_run_record(run_dir: Path):
    """The run record (name, group, job_type, config) of the offline W&B run under ``run_dir``,
    read from its .wandb file: a LevelDB-style log of protobuf records (what `wandb sync` uploads)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("wandb/offline-run-*/*.wandb")
    data, block, pos, chunks = path.read_bytes(), 32768, 7, []  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


def wandb_config(run) -> dict:
    import json

    return {item.key: json.loads(item.value_json) for item in run.config.update}
