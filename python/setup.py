"""Ship the CUDA sources of ../sgl-kernel/csrc inside the package (kvtuner_hicache/csrc).

A non-editable `pip install ./python` then carries what quant/native.py JIT-builds on a GPU machine;
an editable install finds them in the checkout instead. Metadata lives in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent.parent / "sgl-kernel" / "csrc"
        if src.is_dir():
            dst = Path(self.build_lib) / "kvtuner_hicache" / "csrc"
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, dst / f.name)


setup(cmdclass={"build_py": BuildPyWithKernels})
