"""A clone runs on its own: the data it reads lives in the repository, and nothing points beside it."""
import subprocess
from pathlib import Path

from evals import mbxp

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_mbxp_data_lives_in_the_repository(monkeypatch):
    monkeypatch.delenv("CODEFAST_MBXP_DIR", raising=False)
    assert mbxp.data_dir().resolve().is_relative_to(REPO_ROOT)
    assert (mbxp.data_dir() / "LICENSE").is_file()
    for language, file_name in mbxp.FILES.items():
        assert (mbxp.data_dir() / file_name).is_file(), language


def test_no_tracked_file_points_beside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    offenders = []
    for name in tracked:
        if name.startswith(("reports/", "docs/", "data/")) or name == "tests/test_self_contained.py":
            continue  # reports and history quote past runs; the check is on code, config and guides
        path = REPO_ROOT / name
        try:
            text = path.read_text()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        if "../shared" in text or '"shared" / "data"' in text:
            offenders.append(name)
    assert offenders == []


def test_the_project_is_installed_for_any_folder(tmp_path):
    """`make install` installs the project (editable): imports and console scripts work outside it."""
    import os
    import shutil
    import sys
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    code = "import backends, jobs.generate, evals.mbxp; print(evals.mbxp.data_dir())"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve().is_relative_to(REPO_ROOT)
    for script in ("codefast", "codefast-generate", "codefast-serve", "codefast-build-guard",
                   "codefast-export-guard", "codefast-pass-at-k", "codefast-model"):
        assert shutil.which(script), script
    help_text = subprocess.run([shutil.which("codefast-generate"), "--help"], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--output" in help_text.stdout, help_text.stderr[-2000:]
