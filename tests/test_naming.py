"""Our top-level `tokenizers/` package shares its name with Hugging Face's `tokenizers`."""
import importlib.util
import subprocess
import sys

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_hf_tokenizers_is_installed_beside_us():
    # The test extra installs it on purpose, so the checks below are real.
    spec = importlib.util.find_spec("tokenizers")
    assert spec is not None
    out = subprocess.run(
        [sys.executable, "-I", "-c", "import tokenizers, sys; print(tokenizers.__file__)"],
        cwd="/", capture_output=True, text=True, check=True,
    )
    assert "site-packages" in out.stdout


def test_commands_from_repo_root_find_our_package():
    out = subprocess.run(
        [sys.executable, "-c", "import tokenizers.base, tokenizers; print(tokenizers.__file__)"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert str(REPO / "tokenizers") in out.stdout
