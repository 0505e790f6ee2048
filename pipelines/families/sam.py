"""Prompt-guided extraction with SAM Audio, run by mlx-audio's port of the model (PyPI `mlx-audio`, MLX).

Meta's own package (facebookresearch/sam-audio) is not on PyPI and needs git-only dependencies
(dacvae, perception-models); `sam-audio` on PyPI is an empty placeholder and `sam-audio-infer`
only wraps Meta's package. mlx-audio carries a complete port (DACVAE codec, T5 text encoder,
DiT, processor) that reads SAM Audio checkpoints, so this family is built on its classes:
`SAMAudioConfig`, `SAMAudio`, its processor (span anchors) and `SAMAudio.separate`. Against
Meta's code (its DiT, anchors and text memory on the same random weights) the port agrees to
1e-6 but for one term it leaves out, which setup restores from Meta's weights (`zero_video_offset`).

Files, all from the model store and pinned by sha256 (see `catalogue/models/sam.json`):
`<id>.config.json` and `<id>.safetensors` (the checkpoint: mlx-community's layout, or Meta's
PyTorch names, which the package's `sanitize` maps), and the T5 text encoder the checkpoint
conditions on (`t5-base.config.json`, `t5-base.safetensors`, `t5-base.tokenizer.json`), which
the package would otherwise fetch from a hub at run time.

The model works on 48 kHz mono; the engine resamples and folds (`Engine.stream_prompted`)
and stereo modes are composed outside (`pipelines/custom.py`). Long audio is cut into
chunks of `chunk_seconds` overlapping by `overlap_seconds`, joined with the package's own
cosine cross-fade, so memory follows the chunk; each chunk's diffusion noise comes from
`seed` and the chunk's index, so a run is reproducible.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..errors import Cancelled, ModelNotInstalled, PresetError
from ..registry import ModelSpec
from .base import Anchor, PromptedSeparator
from .params import SamParams, validated

if TYPE_CHECKING:
    from ..signals import Signal

log = logging.getLogger(__name__)

TEXT_ENCODER = "t5-base"  # the files' stem in the store; every published SAM Audio size conditions on T5-base


class SamAudioSeparator(PromptedSeparator):
    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        self.settings = validated(SamParams, spec, params)

    def setup(self, device: str = "cpu") -> None:
        try:
            import mlx.core as mx
            from mlx_audio.sts.models.sam_audio import SAMAudio, SAMAudioConfig
        except ImportError as exc:
            raise ModelNotInstalled(
                f"model {self.spec.id!r} needs mlx-audio (SAM Audio's port): pip install 'stems[sam]' ({exc})",
                model_id=self.spec.id,
            ) from None
        self._mx = mx
        self.device = device
        if device != "cpu":
            if mx.is_available(mx.gpu):
                mx.set_default_device(mx.gpu)
            else:
                log.warning("%s: MLX sees no GPU (install mlx[cuda12] for one); running on the CPU", self.spec.id)
        config_file = self._file(f"{self.spec.id}.config.json")
        weights_file = self._file(f"{self.spec.id}.safetensors")
        config = SAMAudioConfig.from_dict(json.loads(config_file.read_text()))
        model = SAMAudio(config)
        # The package's from_pretrained turns any loading error into a warning and a randomly
        # initialised model, and skips tensors whose shape does not fit: we load the same way
        # (its sanitize and load_weights) but refuse a checkpoint that leaves a parameter unset.
        model.processor = _processor(config)
        raw = mx.load(str(weights_file))
        assert isinstance(raw, dict)  # a safetensors file loads as a dict of arrays
        weights = model.sanitize(raw)
        _check_covers(model, weights, weights_file, self.spec.id, skip="wm_model")
        offset = zero_video_offset(raw)
        if offset is not None:
            weights["proj.bias"] = weights["proj.bias"] + mx.array(offset).astype(weights["proj.bias"].dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the package's own "missing" note: checked above
            model.load_weights(list(weights.items()), strict=False)
        mx.eval(model.parameters())
        model.eval()
        model.text_encoder.model, model.text_encoder.tokenizer = self._text_encoder(config.text_encoder.dim)
        self.model = model
        p = self.settings
        self.chunk = int(p.chunk_seconds * self.rate)
        self.overlap = int(p.overlap_seconds * self.rate)
        self.ode_opt = {"method": p.method, "step_size": 1.0 / p.steps}
        self.seed = p.seed

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise ModelNotInstalled(
                f"model {self.spec.id!r} has no file {name!r} in the model store", model_id=self.spec.id, file=name
            )
        return self.files[name]

    def _text_encoder(self, dim: int) -> tuple[Any, Any]:
        """The T5 encoder and tokenizer from the store (the package's classes; it would fetch them by name)."""
        import transformers
        from mlx_audio.sts.models.sam_audio.text_encoder import T5Config, T5Encoder

        mx = self._mx
        cfg_file = self._file(f"{TEXT_ENCODER}.config.json")
        hf = json.loads(cfg_file.read_text())
        if hf.get("d_model") != dim:
            raise ModelNotInstalled(
                f"model {self.spec.id!r} conditions on {dim}-wide text features; {cfg_file} describes a "
                f"{hf.get('d_model')}-wide T5",
                model_id=self.spec.id,
                file=str(cfg_file),
            )
        # the same fields, defaults included, as the package's T5Encoder.from_pretrained reads
        encoder = T5Encoder(
            T5Config(
                vocab_size=hf.get("vocab_size", 32128),
                d_model=hf.get("d_model", 768),
                d_kv=hf.get("d_kv", 64),
                d_ff=hf.get("d_ff", 3072),
                num_layers=hf.get("num_layers", 12),
                num_heads=hf.get("num_heads", 12),
                relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
                relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
                dropout_rate=hf.get("dropout_rate", 0.1),
                layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
                is_gated_act=hf.get("is_gated_act", False),
                dense_act_fn=hf.get("dense_act_fn", "relu"),
            )
        )
        weights_file = self._file(f"{TEXT_ENCODER}.safetensors")
        weights = T5Encoder.sanitize(mx.load(str(weights_file)))
        _check_covers(encoder, weights, weights_file, self.spec.id)
        wanted = _shapes(encoder)  # a full T5 checkpoint also holds a decoder and an LM head: not loaded
        encoder.load_weights([(k, v) for k, v in weights.items() if k in wanted], strict=True)
        mx.eval(encoder.parameters())
        encoder.eval()
        # AutoTokenizer reads a directory: the store's flat names are linked under the ones it expects
        tokdir = Path(tempfile.mkdtemp(prefix=f"stems-{self.spec.id}-tokenizer-"))
        try:
            (tokdir / "config.json").symlink_to(cfg_file.resolve())
            (tokdir / "tokenizer.json").symlink_to(self._file(f"{TEXT_ENCODER}.tokenizer.json").resolve())
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokdir))
        finally:
            for p in tokdir.iterdir():
                p.unlink()
            tokdir.rmdir()
        return encoder, tokenizer

    @property
    def rate(self) -> int:
        return int(self.spec.sample_rate or 48000)

    # -- the step contract ---------------------------------------------------------
    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        raise PresetError(
            f"model {self.spec.id!r} extracts what a prompt describes: run it with a prompt "
            "(the `custom` preset, Engine.stream_prompted)",
            model_id=self.spec.id,
        )

    def encode_prompt(self, prompt: str) -> tuple[str, Any, Any]:
        """Preprocess: the text features of a prompt (used as given, after trimming), once per run."""
        text = prompt.strip()
        if not text:
            raise PresetError("a SAM Audio prompt cannot be empty", field="prompt")
        features, mask = self.model.text_encoder([text])
        self._mx.eval(features, mask)
        return text, features, mask

    def forward(
        self, wav: np.ndarray, text: tuple[str, Any, Any], anchors: list[Anchor], index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Target and residual of one mono 48 kHz chunk (n,), by the package's processor and `separate`."""
        mx = self._mx
        prompt, features, mask = text
        batch = self.model.processor(descriptions=[prompt], audios=[wav], anchors=[anchors] if anchors else None)
        frames = int(batch.sizes[0].item())
        noise = chunk_noise(mx, self.seed, index, frames, self.model.config.audio_codec.codebook_dim, self.model.dtype)
        result = self.model.separate(
            batch.audios,
            batch.descriptions,
            sizes=batch.sizes,
            anchor_ids=batch.anchor_ids,
            anchor_alignment=batch.anchor_alignment,
            audio_pad_mask=batch.audio_pad_mask,
            noise=noise,
            ode_opt=self.ode_opt,
            _text_features=features,
            _text_mask=mask,
        )
        n = wav.shape[0]
        # postprocess: (samples, 1) arrays padded to whole codec frames, cut back to the chunk
        return (
            np.asarray(result.target[0], dtype=np.float32)[:n, 0],
            np.asarray(result.residual[0], dtype=np.float32)[:n, 0],
        )

    def extract_stream(
        self,
        audio: Signal,
        sample_rate: int,
        prompt: str,
        anchors: list[Anchor],
        block: int,
        cancelled: Callable[[], bool],
    ) -> Iterator[dict[str, np.ndarray]]:
        """Target and residual of a mono 48 kHz signal, as consecutive (1, k) blocks covering it.

        Chunks are this model's own (`chunk_seconds`, `overlap_seconds`: the output depends on
        them, so the engine's `block` does not set them); anchors are shifted into each chunk.
        """
        if audio.channels != 1 or sample_rate != self.rate:
            raise ValueError(f"SAM Audio takes mono {self.rate} Hz audio, got {audio.channels} ch at {sample_rate} Hz")
        text = self.encode_prompt(prompt)
        n, chunk, overlap = audio.frames, self.chunk, self.overlap
        tail: tuple[np.ndarray, np.ndarray] | None = None
        fade_in = crossfade(overlap)
        bounds = chunk_bounds(n, chunk, overlap)
        for i, (start, stop) in enumerate(bounds):
            if cancelled():
                raise Cancelled("job cancelled")
            wav = np.ascontiguousarray(audio.read(start, stop)[0], dtype=np.float32)
            target, residual = self.forward(wav, text, shift_anchors(anchors, start / self.rate, stop / self.rate), i)
            if tail is not None:
                target[:overlap] = tail[0] * (1 - fade_in) + target[:overlap] * fade_in
                residual[:overlap] = tail[1] * (1 - fade_in) + residual[:overlap] * fade_in
            last = i == len(bounds) - 1
            keep = len(target) if last else len(target) - overlap
            tail = None if last else (target[keep:].copy(), residual[keep:].copy())
            yield {"target": target[None, :keep], "residual": residual[None, :keep]}


def zero_video_offset(raw: dict[str, Any]) -> np.ndarray | None:
    """What Meta's model adds to every input frame of a text-only prompt, which the port leaves out.

    Meta's `separate` aligns all-zero video features when no video is given (AlignModalities:
    a 1x1 conv, LayerNorm, tanh gate), which adds tanh(gate) * LayerNorm(conv.bias) to every frame
    of the DiT input; mlx-audio's sanitize drops those weights and skips the step. The term does
    not depend on the input, so it folds into `proj.bias`. A checkpoint without the weights
    (mlx-community's conversions) gives None: nothing can be restored.
    """
    keys = (
        "align_masked_video.conv.bias",
        "align_masked_video.gate",
        "align_masked_video.layer_norm.weight",
        "align_masked_video.layer_norm.bias",
    )
    if not all(k in raw for k in keys):
        return None
    bias, gate, weight, shift = (np.asarray(raw[k], dtype=np.float64) for k in keys)
    norm = (bias - bias.mean()) / np.sqrt(bias.var() + 1e-5) * weight + shift  # torch.nn.LayerNorm, eps 1e-5
    return cast(np.ndarray, (np.tanh(gate.reshape(-1)[0]) * norm).astype(np.float32))


def chunk_bounds(n: int, chunk: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk: one when the signal fits, else hops of chunk - overlap (as the package's separate_long)."""
    if n <= chunk:
        return [(0, n)]
    hop = chunk - overlap
    return [(i * hop, min(i * hop + chunk, n)) for i in range(math.ceil((n - overlap) / hop))]


def crossfade(overlap: int) -> np.ndarray:
    """The package's cosine fade-in over `overlap` samples (separate_long: 0.5 * (1 - cos(pi * linspace(0, 1))))."""
    t = np.linspace(0.0, 1.0, overlap, dtype=np.float32)
    return cast(np.ndarray, (0.5 * (1 - np.cos(np.pi * t))).astype(np.float32))


def chunk_noise(mx: Any, seed: int, index: int, frames: int, codebook_dim: int, dtype: Any) -> Any:
    """The initial diffusion noise of chunk `index`: one key per chunk, independent of any global random state."""
    return mx.random.normal((1, frames, 2 * codebook_dim), dtype=dtype, key=mx.random.key(seed + index))


def shift_anchors(anchors: list[Anchor], lo: float, hi: float) -> list[Anchor]:
    """Anchors (s) that overlap [lo, hi), clipped to it and moved into its time base."""
    return [(sign, max(a, lo) - lo, min(b, hi) - lo) for sign, a, b in anchors if b > lo and a < hi]


def _shapes(module: Any) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten

    flat = tree_flatten(module.parameters())
    assert isinstance(flat, list)  # of (dotted name, array): no destination given
    return {k: tuple(v.shape) for k, v in flat}


def _check_covers(module: Any, weights: dict[str, Any], path: Path, model_id: str, skip: str | None = None) -> None:
    """Every parameter of `module` has a tensor in `weights` of its shape (or a transpose the package undoes)."""
    bad = []
    for key, shape in _shapes(module).items():
        if skip and skip in key:
            continue
        value = weights.get(key)
        if value is None or not _fits(tuple(value.shape), shape):
            bad.append(f"{key} (wants {shape}, file has {None if value is None else tuple(value.shape)})")
    if bad:
        raise ModelNotInstalled(
            f"{path} does not fit model {model_id!r}'s configuration: {len(bad)} parameters missing or misshapen, "
            f"e.g. {'; '.join(bad[:3])}",
            model_id=model_id,
            file=str(path),
            mismatched=len(bad),
        )


def _fits(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """The layouts SAMAudio.load_weights accepts: as is, a transposed matrix, or a PyTorch conv kernel."""
    if have == want:
        return True
    if len(have) == 2:
        return have == want[::-1]
    if len(have) == 3 and len(want) == 3:
        return have in ((want[0], want[2], want[1]), (want[2], want[0], want[1])) or (
            have[1:] == (1, 1) and have[0] == want[2]
        )
    return False


def _processor(config: Any) -> Any:
    from mlx_audio.sts.models.sam_audio import SAMAudioProcessor

    return SAMAudioProcessor(
        audio_hop_length=config.audio_codec.hop_length, audio_sampling_rate=config.audio_codec.sample_rate
    )
