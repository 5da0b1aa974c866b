"""What pyproject.toml cannot say: one file installed at the top of site-packages, lmforge-lm-eval.pth.

Its one line lets `lm_eval --model lmforge` find lmforge in any process (src/lmforge/eval/lm_eval_plugin.py
says why lm-eval 0.4.13 needs it). A wheel carries the file from build_py's output folder; an editable
install (`pip install -e`) builds no such folder into its wheel, so there the file goes where setuptools
assembles the editable wheel, the folder the editable build's install command points install_lib at.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "lmforge-lm-eval.pth"
PTH_LINE = "import lmforge.eval.lm_eval_plugin as p; p.install()\n"


class BuildPyWithPth(build_py):
    """build_py, plus the .pth file next to the packages."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            folder = self.get_finalized_command("install").install_lib
        else:
            folder = self.build_lib
        path = Path(folder, PTH_NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PTH_LINE, encoding="utf-8")


setup(cmdclass={"build_py": BuildPyWithPth})
