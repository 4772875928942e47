"""`import kvserve` caps OpenBLAS's busy-wait, and knows when it came too late to do so."""

import os
import subprocess
import sys

REPORT = "print(kvserve.OPENBLAS_SPIN_CAPPED, os.environ['OPENBLAS_THREAD_TIMEOUT'])"


def run(imports: str, **env) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    code = f"import os; {imports}; {REPORT}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**environ, **env}).stdout.split()


def test_kvserve_first_caps_the_spin():
    assert run("import kvserve") == ["True", "12"]


def test_numpy_first_is_noticed_and_a_user_setting_is_kept():
    assert run("import numpy, kvserve") == ["False", "12"]
    assert run("import numpy, kvserve", OPENBLAS_THREAD_TIMEOUT="20") == ["True", "20"]
