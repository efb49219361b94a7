import importlib.util
import shutil
import subprocess
import sys

import core.provenance

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]


def copy_of_module(folder, name):
    """core/provenance.py copied to folder/core/, imported from there: it then describes that folder."""
    target = folder / "core" / "provenance.py"
    target.parent.mkdir(parents=True)
    shutil.copy(core.provenance.__file__, target)
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop(name, None)
    return module


def git(folder, *args):
    return subprocess.run([*GIT, "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_commit_and_dirty_state_of_a_checkout(tmp_path):
    module = copy_of_module(tmp_path, "prov_repo")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "core")
    git(tmp_path, "commit", "-q", "-m", "x")
    assert module.code_version() == {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "new.py").write_text("")  # untracked code is a change too
    assert module.code_version()["dirty"] is True


def test_unknown_outside_a_checkout_of_its_own(tmp_path):
    assert copy_of_module(tmp_path / "plain", "prov_plain").code_version() == {"commit": "unknown", "dirty": "unknown"}
    # inside another project's repository (e.g. a vendored copy): not that repository's commit
    git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-q", "-m", "x")
    nested = copy_of_module(tmp_path / "vendored", "prov_nested")
    assert nested.code_version() == {"commit": "unknown", "dirty": "unknown"}


def test_unknown_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert core.provenance.code_version() == {"commit": "unknown", "dirty": "unknown"}
