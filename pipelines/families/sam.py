"""Prompt-guided extraction with SAM Audio: declared, but no adapter ships in this version.

The registry lists the SAM Audio model ids so deployments can see them in `stems models
list`, and `custom` prompts that name a stem an installed chain produces are routed to that
chain instead (see `Catalogue.route_prompt`). Loading a SAM model fails loudly here rather
than pretending: the weights' own package and its inference API are not available to build
and test against.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelNotInstalled
from .base import Separator


class SamAudioSeparator(Separator):
    streamable = False

    def setup(self, device: str = "cpu") -> None:
        raise ModelNotInstalled(
            f"model {self.spec.id!r}: this version of stems has no SAM Audio adapter; use a prompt that names an "
            "installed stem ('lead vocal', 'drums', 'bass', 'speech', 'snare and kick') or another preset",
            model_id=self.spec.id)

    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:  # pragma: no cover
        raise ModelNotInstalled(f"model {self.spec.id!r} is not loaded", model_id=self.spec.id)
