"""Without TRL, importing logitsam.trl says how to install it (runs with or without trl installed)."""

import subprocess
import sys


def test_import_without_trl_names_the_extra():
    code = "import sys; sys.modules['trl'] = None\nimport logitsam.trl"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "pip install 'logitsam[trl]'" in proc.stderr
