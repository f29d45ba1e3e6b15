"""The real-world video corpus (tools/make_test_corpus.py), built once per test session.

Import the fixture into a test module with ``from tests.video_corpus import video_corpus  # noqa: F401``.
The corpus is written under the session's base temporary directory and reused when several modules
import the fixture, so it is built once per session (a few seconds). Without the ``ffmpeg`` binary
the tests that need it skip, saying so (CI installs it: see .ci/run).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tools.make_test_corpus import MANIFEST, CorpusConfig, build


@dataclass
class Corpus:
    """The built corpus: its directory and manifest (see tools/make_test_corpus.py)."""

    root: Path
    manifest: dict

    def path(self, name: str) -> str:
        return str(self.root / self.manifest[name]["file"])

    def truth(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Frame numbers and presentation times (s from the first shown frame) of the shown frames."""
        frames = self.manifest[name]["frames"]
        return np.array([c for c, _ in frames]), np.array([t for _, t in frames], dtype=np.float64)


@pytest.fixture(scope="session")
def video_corpus(tmp_path_factory) -> Corpus:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("the ffmpeg binary is not installed (apt-get install ffmpeg); .ci/run installs it")
    root = tmp_path_factory.getbasetemp() / "video_corpus"
    manifest = root / MANIFEST
    if not manifest.exists():  # another module's copy of this fixture may have built it already
        build(CorpusConfig(root))
    return Corpus(root, json.loads(manifest.read_text()))
