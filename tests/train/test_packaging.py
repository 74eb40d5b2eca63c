"""A plain (not editable) install ships the configs and the sample data: `python -m longctx.train`
runs from any folder against the installed wheel."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from test_train import SMALL

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_configs_and_trains_from_another_folder(tmp_path):
    source = tmp_path / "source"   # a copy, so that building leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "runs", "wandb", "outputs",
                                                               "*.egg-info", "__pycache__", ".pytest_cache", "cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path / "wheels")], check=True, capture_output=True, timeout=600)
    wheel, = (tmp_path / "wheels").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"longctx/_project/{p.relative_to(REPO)}" for folder in ("configs", "data")
               for p in (REPO / folder).rglob("*") if p.is_file() and "cache" not in p.parts}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "longctx/ops/attention/auto_table.json" in names   # model.attention=auto's measured table

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")   # the wheel, not this checkout
    where = subprocess.run([sys.executable, "-c", "import longctx; print(longctx.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(site / "longctx" / "__init__.py")
    proc = subprocess.run([sys.executable, "-m", "longctx.train", *SMALL, "train.steps=1", "data.verbose=false",
                           "checkpoint.export_hf=false", f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: steps 1-1" in proc.stdout
    run, = (elsewhere / "runs").iterdir()
    assert (run / "metrics.jsonl").is_file()
