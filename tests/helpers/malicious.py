"""What a malicious checkpoint holds: an object whose unpickling runs a shell command."""

from __future__ import annotations

import os
from pathlib import Path


class RunsCode:
    """Unpickling this calls ``os.system("touch MARKER")``: if ``marker`` exists afterwards, code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
