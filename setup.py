"""Only what pyproject.toml cannot say: ship src/gptlab-lm-eval.pth at the top of the installed
tree, so that Python runs its line at start-up and `lm_eval --model gptlab` finds gptlab's model
(see src/gptlab_lm_eval_plugin.py). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).parent / "src" / "gptlab-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        # an editable install ships only what lands in install_lib (the wheel's root); a normal
        # build ships build_lib
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(str(PTH), str(Path(target) / PTH.name))


setup(cmdclass={"build_py": BuildPyWithPth})
