"""Every family's params models, free of torch and of the families' runtimes.

A model's params are its registry entry's, overridden by the store manifest's. Keeping the
models here, apart from the code that runs them, lets the registry check every entry's params
when it loads and `stems models install --params` check an operator's before they are written,
in any process (the API and `cpu` workers never import torch). A family's separator validates
the same model again when it is made, so a hand-edited manifest cannot slip past.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ChainError

if TYPE_CHECKING:
    from ..registry import ModelSpec


def _at_least_one(v: int | str) -> int | str:
    if isinstance(v, int) and v < 1:
        raise ValueError("batch must be at least 1")
    return v


Batch = Annotated[int | Literal["auto"], AfterValidator(_at_least_one)]  # items per forward
Precision = Literal["auto", "float32", "bfloat16", "float16"]  # autocast dtype of the forward

# A GPU's defaults for Demucs, from bench/gpu.py on an H200 (random full-size htdemucs, a 5-minute
# track): 16 segments per forward ran 2.2x as fast as one at a time (6.3 GiB of CUDA memory), and
# bfloat16 autocast on top 2.7x as fast as demucs's apply_model, with output 44 dB from the float32
# output (float16: 2.3x, 63 dB). A mixed-precision forward whose output is not finite runs again in
# float32 (TorchSeparator._forward): an overflow costs time, never a corrupt stem.
DEMUCS_GPU_BATCH = 16
DEMUCS_GPU_PRECISION = "bfloat16"
ROFORMER_GPU_PRECISION = "float16"  # MSST's demix: torch.cuda.amp.autocast(enabled=training.use_amp), float16


class DemucsParams(BaseModel):
    """A demucs model's settings: `spec.params`, overridden by the store manifest's params."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="demucs model name: a checkpoint signature or a bag yaml's stem")
    segment: float | None = Field(None, gt=0, description="seconds per forward; None = the model's own")
    overlap: float = Field(0.25, ge=0, lt=1)
    shifts: int = Field(
        0, ge=0, description="random time shifts averaged (the CLI's --shifts); >0 is not deterministic"
    )
    batch: Batch = Field(
        "auto",
        description="segments per forward; 1 runs apply_model exactly as the CLI does; "
        f"auto: 1 on a CPU, {DEMUCS_GPU_BATCH} on a GPU",
    )
    precision: Precision = Field(
        "auto",
        description="autocast dtype of the forward; float16 needs CUDA; auto: float32 on a CPU, "
        f"{DEMUCS_GPU_PRECISION} on a GPU (bench/gpu.py measures its distance from float32); "
        "bfloat16 on a CPU runs torch's CPU autocast, worth it only with AVX512-BF16 or AMX "
        "(within 30 dB of float32, worst stem, on the random htdemucs: tests/pipelines/"
        "test_streaming.py)",
    )
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what runs the network: torch, or ONNX Runtime from a file derived from the weights "
        "(CPU, float32; same stems within 1e-3); auto: the one measured faster on this CPU "
        "(timed once per CPU and library versions, kept in the store; `stems models bench`)",
    )

    def resolved(self, device: str) -> tuple[int, str]:
        """(batch, precision) on `device`: `auto` is the exact CLI path on a CPU, batched mixed precision on a GPU."""
        gpu = not device.startswith("cpu")
        batch = self.batch if self.batch != "auto" else (DEMUCS_GPU_BATCH if gpu else 1)
        precision = self.precision if self.precision != "auto" else (DEMUCS_GPU_PRECISION if gpu else "float32")
        return batch, precision


class RoformerParams(BaseModel):
    """A roformer model's settings: `spec.params`, overridden by the store manifest's params.

    The inference settings default to the checkpoint's config (None); set them to override it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    arch: Literal["bs_roformer", "mel_band_roformer"] = Field(description="MSST's --model_type")
    config: str = Field(description="the YAML config among the model's files")
    checkpoint: str = Field(description="the state dict among the model's files")
    sources: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "the config's instrument names -> registry source names (a name not listed keeps its own); "
            "several config names may map to one source, for the copies of a config that name it differently"
        ),
    )
    residual: str | None = Field(None, description="a source that is the mix minus the model's one target")
    chunk_size: int | None = Field(None, ge=10, description="samples per forward; None: the config's")
    num_overlap: int | None = Field(None, ge=1, description="chunks covering each sample; None: the config's")
    batch_size: int | None = Field(None, ge=1, description="MSST's inference.batch_size: chunks sharing a window")
    normalize: bool | None = Field(None, description="normalise the mix by its mono mean and std; None: the config's")
    batch: Batch = Field(
        "auto", description="chunks per forward (does not change the output); auto: the config's inference.batch_size"
    )
    precision: Precision = Field(
        "auto",
        description="autocast dtype of the forward; auto: float32 on a CPU, float16 on a CUDA device "
        "when the config's training.use_amp (MSST's default), else float32",
    )


class SpleeterParams(BaseModel):
    """The `params` of a `spleeter` model (registry entry, overridden by the store manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mask_exponent: float = Field(2.0, gt=0.0, description="Spleeter's separation exponent of the ratio masks")
    mask_extension: Literal["zeros", "average"] = Field(
        "zeros", description="masks above the lowest 1024 bins: Spleeter's zeros, or each frame's mean mask"
    )
    wiener_iterations: int = Field(0, ge=0, description="EM iterations of the multichannel Wiener filter; 0 = masks")
    swap_channels: bool = Field(
        False, description="average with a run on the channel-swapped mix (test-time augmentation)"
    )
    instrumental: Literal["mask", "residual"] = Field(
        "mask", description="the second source from its own mask, or as the mix less the first"
    )
    vocals_highpass_hz: float = Field(
        0.0,
        ge=0.0,
        description="bins below this give the first source nothing "
        "(voices have no energy there; what the network leaves is bass and kick)",
    )
    repet_sim_blend: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="weight of the DSP REPET-SIM foreground in the first source "
        "(the rest is the network's); the second source gets the rest of the mix the same way",
    )
    batch: int = Field(1, ge=1, description="512-frame segments per network call")
    precision: Literal["float32", "bfloat16", "float16"] = "float32"


class MdxParams(BaseModel):
    """The `params` of an `onnx_spec` model (registry entry, overridden by the store manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    n_fft: int = Field(gt=0)
    hop: int = Field(gt=0)
    dim_f: int = Field(gt=0, description="lowest STFT bins the network sees")
    dim_t: int = Field(gt=0, description="frames per segment the network was trained on")
    output: Literal["spectrogram", "mask", "multi"] = "spectrogram"
    segment_frames: int | None = Field(None, gt=0, description="frames per network call; default dim_t")
    overlap: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of a segment shared with the next")
    primary: str | None = Field(None, description="the source the network predicts (not for multi)")
    batch_size: int = Field(4, gt=0, description="segments per network call, unless the model fixes it")
    compensate: float = Field(1.0, gt=0.0, description="gain on the network's output (UVR's per-model 'compensate')")
    zero_low_bins: int = Field(3, ge=0, description="lowest input bins zeroed before the network, as UVR does")

    @model_validator(mode="after")
    def _check(self) -> MdxParams:
        if self.dim_f > self.n_fft // 2 + 1:
            raise ValueError(f"dim_f {self.dim_f} exceeds the {self.n_fft // 2 + 1} bins of an n_fft {self.n_fft} STFT")
        if self.hop > self.n_fft:
            raise ValueError(f"hop {self.hop} is longer than n_fft {self.n_fft}")
        return self

    @property
    def frames(self) -> int:
        return self.segment_frames or self.dim_t

    @property
    def step(self) -> int:
        return max(1, self.frames - int(round(self.frames * self.overlap)))


class SamParams(BaseModel):
    """The `params` of a SAM Audio model: its chunking and the flow-matching ODE solver (mlx-audio's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    chunk_seconds: float = Field(10.0, gt=0.0, description="seconds per forward")
    overlap_seconds: float = Field(3.0, ge=0.0, description="seconds shared with the next chunk (cosine cross-fade)")
    steps: int = Field(16, ge=1, description="ODE steps")
    method: Literal["midpoint", "euler"] = Field("midpoint", description="the ODE solver (mlx-audio's odeint)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SamParams:
        if self.overlap_seconds >= self.chunk_seconds:
            raise ValueError("overlap_seconds must be under chunk_seconds")
        return self


FAMILY_PARAMS: dict[str, type[BaseModel]] = {
    "demucs": DemucsParams,
    "roformer": RoformerParams,
    "spleeter": SpleeterParams,
    "onnx_spec": MdxParams,
    "sam": SamParams,
}


def params_model(spec: ModelSpec, params: dict[str, Any]) -> type[BaseModel]:
    """The model `params` of `spec` must fit: the family's, or for DSP the method's and for speech the backend's."""
    if spec.family == "dsp":
        from .dsp.params import METHOD_PARAMS  # pydantic models only: no scipy in the API

        method = params.get("method")
        if method not in METHOD_PARAMS:
            raise ChainError(
                f"dsp model {spec.id!r} names method {method!r}; known: {sorted(METHOD_PARAMS)}",
                model_id=spec.id,
                method=method,
            )
        return METHOD_PARAMS[method]
    if spec.family == "speech":
        from .speech import BACKENDS  # numpy, ctypes; their runtimes load when a backend is made

        if spec.id not in BACKENDS:
            raise ChainError(f"speech model {spec.id!r} has no backend; known: {sorted(BACKENDS)}", model_id=spec.id)
        return BACKENDS[spec.id].Params
    return FAMILY_PARAMS[spec.family]


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], spec: ModelSpec, params: dict[str, Any]) -> M:
    """`params` as `model`, or a ChainError naming the model and what is wrong."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise ChainError(f"invalid {spec.family} params for {spec.id!r}: {exc}", model_id=spec.id) from exc


def check_params(spec: ModelSpec, params: dict[str, Any]) -> BaseModel:
    """`params` validated for `spec` (the registry at load, `stems models install --params`)."""
    return validated(params_model(spec, params), spec, params)
