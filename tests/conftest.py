import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    return shared_data("imagenet-sample")


@pytest.fixture(scope="session")
def bad_images() -> Path:
    return shared_data("bad-images")


class Killed(Exception):
    """Stands for the process dying right after it wrote a checkpoint."""


@pytest.fixture
def killed_after_checkpoint(monkeypatch):
    """`killed_after_checkpoint(step, fn, *args)` runs fn(*args) and stops it with Killed right after it
    saves the training state of `step` (RunFolder.save_training_state), as a crash there would."""
    from core.runtime import RunFolder

    def run(at: int, fn, *args, **kwargs) -> None:
        save = RunFolder.save_training_state

        def save_then_die(self, step, *a, **kw):
            path = save(self, step, *a, **kw)
            if step == at:
                raise Killed
            return path

        with monkeypatch.context() as m:
            m.setattr(RunFolder, "save_training_state", save_then_die)
            with pytest.raises(Killed):
                fn(*args, **kwargs)

    return run


@pytest.fixture(scope="session")
def launch():
    """`launch(nproc, module, *args)` runs `torchrun --standalone --nproc_per_node <nproc> -m <module> <args>` from
    the repository root: CPU processes talking over gloo (DESIGN §9), one thread each."""

    def run(nproc: int, module: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return run


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
