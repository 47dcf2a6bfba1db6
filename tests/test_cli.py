"""The command line: one-line errors with exit code 2."""

import subprocess
import sys


def test_unknown_flag_is_one_line_and_exit_2():
    """A typo in a flag: one line naming it, exit code 2, no usage dump and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "convnext_fast", "train", "--epochz", "3"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--epochz" in lines[0] and "error" in lines[0], proc.stderr
