"""Ship the top-level recipes/, datasets/ and eval/ folders inside the wheel.

They live beside the package (the layout users edit), so build_py copies them to
finetune/_resources/, where `finetune.config.resource_dir` finds them after a non-editable install.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCES = ("recipes", "datasets", "eval")


class BuildWithResources(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for kind in RESOURCES:
            src, dst = root / kind, Path(self.build_lib) / "finetune" / "_resources" / kind
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithResources})
