"""The wheel carries configs/ and the sample data/ inside the package (longctx/_project/), so that
`python -m longctx.train` runs from any folder after a plain `pip install .`. A source checkout
(an editable install, PYTHONPATH) reads them where they are; see longctx.data.sharegpt.PROJECT_ROOT."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROJECT_FOLDERS = ("configs", "data")


class BuildWithProjectFiles(build_py):
    def run(self):
        super().run()
        if self.editable_mode:   # the package is read from the checkout, beside these folders
            return
        here = Path(__file__).resolve().parent
        for folder in PROJECT_FOLDERS:
            shutil.copytree(here / folder, Path(self.build_lib) / "longctx" / "_project" / folder,
                            dirs_exist_ok=True, ignore=shutil.ignore_patterns("cache", "__pycache__"))


setup(cmdclass={"build_py": BuildWithProjectFiles})
