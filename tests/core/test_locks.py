"""One writer per output folder (core.locks): evolve runs and ATM merges refuse a folder that
another process is writing, before they read or write anything, and a killed holder frees it."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.locks import FolderBusy, exclusive, lock_path

ROOT = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from core.locks import exclusive
with exclusive(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """Another process holding the lock of tmp_path / "out"; yields (folder, process)."""
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "a test job"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_second_holder_is_refused_and_release_frees_the_folder(tmp_path):
    folder = tmp_path / "run"
    with exclusive(folder, "an evolve run"):
        assert lock_path(folder).is_file()
        with pytest.raises(FolderBusy, match=r"another process \(pid \d+\) is writing an evolve run"):
            with exclusive(folder):
                pass
    assert not lock_path(folder).exists()
    with exclusive(folder):
        pass


def test_a_killed_holder_leaves_the_folder_free(held):
    folder, proc = held
    with pytest.raises(FolderBusy):
        with exclusive(folder):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_path(folder).exists()  # a SIGKILLed holder cannot remove its file, but the kernel drops the lock
    deadline = time.monotonic() + 10
    while True:
        try:
            with exclusive(folder):
                break
        except FolderBusy:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_evolve_and_atm_refuse_a_folder_in_use_before_touching_it(held):
    """The lock comes before everything else: the inputs here do not even exist, and the error is
    the lock's, not theirs; the folder and ATM's state beside it are not created."""
    from evolve.run import run
    from merging.atm import run_atm, state_dir_for
    from merging.spec import MergeSpec

    folder, _ = held
    evolve = {"kind": "evolve", "base": "nowhere/base", "models": [{"name": "a", "path": "nowhere/a"}],
              "method": "task_arithmetic", "objectives": [{"benchmark": "nowhere/b.jsonl"}]}
    with pytest.raises(FolderBusy, match=r"another process \(pid \d+\) is writing a test job"):
        run(evolve, folder, resume=True)
    atm = MergeSpec.model_validate({"kind": "merge", "base": "nowhere/base", "method": "atm",
                                    "models": [{"name": "a", "train": "nowhere/a.jsonl"}]})
    with pytest.raises(FolderBusy, match="is writing a test job"):
        run_atm(atm, folder)
    assert not folder.exists() and not state_dir_for(folder).exists()


def test_cli_reports_a_busy_folder_as_an_error(held, tmp_path):
    folder, _ = held
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: evolve\nbase: nowhere/base\nmodels: [{name: a, path: nowhere/a}]\n"
                    "method: task_arithmetic\nobjectives: [{benchmark: nowhere/b.jsonl}]\n")
    r = subprocess.run([sys.executable, "-m", "service.cli", "evolve", str(spec), "--out", str(folder), "--resume"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "is writing a test job" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
