"""Build small *real* runtimes from this host's own binaries and interpreter, for tests.

The builder is the package's own (``jbl/cli/hostruntime.py``, which ``make demo`` uses too):
one implementation, so the demo and the tests build runtimes the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jbl.cli.hostruntime import HOST_PYTHON, HOST_STDLIB, PRUNE, TOOLS, _copy_file, build_runtime

__all__ = ["HOST_PYTHON", "HOST_STDLIB", "PRUNE", "TOOLS", "_copy_file", "build_runtime"]

if __name__ == "__main__":  # python tests/rtbuild.py DEST [NAME VERSION]
    print(build_runtime(Path(sys.argv[1]), *sys.argv[2:4]))
