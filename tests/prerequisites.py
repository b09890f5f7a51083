"""What the optional test groups need from the system, and how to get it."""

from __future__ import annotations

import importlib.util
import os

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Debian package that provides each program
BROWSER_PACKAGES = {CHROMIUM: "chromium", CHROMEDRIVER: "chromium-driver"}


def missing_browser_parts(exists=os.path.exists, find_spec=importlib.util.find_spec) -> str | None:
    """Why the browser tests cannot run here (what is missing and how to install it), or None.

    >>> missing_browser_parts(exists=lambda path: path == CHROMIUM, find_spec=lambda name: True)
    'chromium-driver is missing (no /usr/bin/chromedriver): apt-get install chromium-driver'
    """
    absent = [path for path in BROWSER_PACKAGES if not exists(path)]
    reasons = []
    if absent:
        packages = " ".join(BROWSER_PACKAGES[path] for path in absent)
        where = ", ".join(absent)
        verb = "is" if len(absent) == 1 else "are"
        reasons.append(f"{' and '.join(BROWSER_PACKAGES[p] for p in absent)} {verb} missing (no {where}): "
                       f"apt-get install {packages}")
    if find_spec("selenium") is None:
        reasons.append('selenium is missing: pip install selenium (or pip install ".[test]")')
    return "; ".join(reasons) or None


def skip_without_dynamo_exporter(dynamo: bool) -> None:
    """Skip a test that exports with torch's dynamo ONNX exporter (``dynamo=True``) where
    onnxscript, which that exporter imports, is missing: the test extra installs it, and
    onnx and onnxruntime alone leave it out."""
    if dynamo:
        import pytest

        pytest.importorskip("onnxscript")


def normlab_torch_or_skip():
    """``normlab.torch``, or a skip that names PyTorch where it is missing. (Without torch,
    ``normlab.torch`` raises an ImportError that names the extra to install; pytest 9's
    ``importorskip("normlab.torch")`` skips only a ModuleNotFoundError, so it fails there.)"""
    import pytest

    pytest.importorskip("torch")
    import normlab.torch

    return normlab.torch
