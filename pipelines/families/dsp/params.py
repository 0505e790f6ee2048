"""Each method's typed params, validated when its model is loaded; each says how much context it needs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .grid import support


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hop_s: float = Field(0.023, gt=0, le=0.2, description="STFT hop in seconds (rounded to a divisor of the rate)")

    def context_seconds(self) -> float | None:
        """Seconds of neighbouring audio an output sample depends on; None = further (the method streams itself)."""
        raise NotImplementedError


class CentreParams(_Params):
    """Phantom centre: a mid-channel mask from the side-to-mid power ratio, after cancelling the part of
    the mid that the side channel predicts (content panned off-centre shows up in both)."""

    method: Literal["centre"] = "centre"
    threshold_db: float = Field(-15.0, description="side/mid power ratio at which a bin counts half as centre")
    sharpness: float = Field(2.0, gt=0, description="exponent of the mask's transition")
    smooth_frames: int = Field(1, ge=0, description="time smoothing of the powers, frames each side")
    predict_frames: int = Field(3, ge=0, description="time span of the side-to-mid regression, frames each side")
    predict_bins: int = Field(2, ge=0, description="frequency span of the side-to-mid regression, bins each side")

    def context_seconds(self) -> float:
        return support(self.hop_s, 2 * self.smooth_frames + self.predict_frames)


class HpssParams(_Params):
    """Harmonic/percussive separation by median filtering, soft masks, a long window and long time kernel."""

    method: Literal["hpss"] = "hpss"
    hop_s: float = Field(0.046, gt=0, le=0.2)
    time_s: float = Field(1.2, gt=0, description="harmonic median filter length along time")
    freq_hz: float = Field(150.0, gt=0, description="percussive median filter length along frequency")
    mask_power: float = Field(1.5, gt=0, description="exponent of the soft masks")

    def context_seconds(self) -> float:
        return support(self.hop_s, 1, self.time_s / 2)


class RepetSimParams(_Params):
    """REPET-SIM foreground (what does not repeat) restricted to centred content above `lowcut_hz`."""

    method: Literal["repet_sim"] = "repet_sim"
    neighbours: int = Field(30, ge=2, description="most similar frames whose median models the background")
    min_separation_s: float = Field(2.0, ge=0, description="similar frames must be at least this far apart")
    # Similar frames are looked for within this distance: compute grows with the track times
    # the window, not with its square, and memory with the window, not the track. Bars,
    # loops and phrases repeat well within a minute; a chorus two minutes later adds little.
    window_s: float = Field(60.0, gt=0, description="similar frames are looked for this far either side")
    centre_threshold_db: float | None = Field(
        -15.0, description="stereo: keep foreground where side/mid is below this; None = off"
    )
    harmonic: bool = Field(False, description="keep only harmonic (not percussive) foreground")
    # a voice's energy sits mostly above 300 Hz, while below it bass, kick and the low end of the band dominate
    lowcut_hz: float = Field(300.0, ge=0, description="no foreground below this frequency")
    mask_power: float = Field(0.7, gt=0, description="exponent of the final soft masks")

    def context_seconds(self) -> None:
        return None  # a minute either side: chunks would be mostly context, so it streams (`foreground_stream`)


class WpeParams(_Params):
    """Multichannel WPE (whole-track filters), then, for stereo, a coherence-based late-reverb post-filter."""

    method: Literal["wpe"] = "wpe"
    taps: int = Field(10, ge=1, description="prediction filter length in frames")
    delay: int = Field(3, ge=1, description="prediction delay in frames (keeps the direct sound and early echoes)")
    iterations: int = Field(1, ge=1, description="WPE iterations (power re-estimation)")
    post_filter: bool = Field(True, description="stereo: also remove the diffuse (incoherent) remainder")
    coherence_exponent: float = Field(
        4.0, gt=0, description="how strictly the side channel must be coherent to be kept"
    )

    def context_seconds(self) -> None:
        return None  # the filters are estimated from the whole track (`dry_stream` makes a pass per iteration)


class GateParams(_Params):
    """Spectral gate: Wiener-like gain against a noise profile from minimum statistics, and in stereo from
    the channel orthogonal to the main direction when that channel is as steady as a noise floor."""

    method: Literal["spectral_gate"] = "spectral_gate"
    floor_s: float = Field(2.0, gt=0, description="minimum-statistics window")
    steer_s: float = Field(2.0, gt=0, description="stereo: window over which the main direction is estimated")
    steady_ratio: float = Field(2.0, gt=0, description="stereo: side power up to this times its floor counts as noise")
    exponent: float = Field(2.0, gt=0, description="exponent of the gain (larger = stronger gating)")
    smooth_frames: int = Field(2, ge=0)
    smooth_bins: int = Field(2, ge=0)
    min_gain: float = Field(0.0, ge=0, le=1, description="largest attenuation, as a gain")
    highpass_hz: float = Field(
        20.0, ge=0, description="content below this (infrasound, DC, rumble) counts as noise; 0 = off"
    )

    def context_seconds(self) -> float:
        # noise power at a frame: a floor_s minimum, averaged over floor_s, of a channel steered over steer_s
        return support(self.hop_s, self.smooth_frames + 2, self.floor_s + self.steer_s / 2)


class EnhancerParams(GateParams):
    """Restoration: de-clip, de-click, a gentle gate and a rumble filter; `strength` mixes it with the input."""

    method: Literal["universal_enhancer"] = "universal_enhancer"  # type: ignore[assignment]
    strength: float = Field(1.0, ge=0, le=1, description="wet/dry mix: 0 returns the input, 1 the full restoration")
    min_gain: float = Field(0.1, ge=0, le=1, description="the gate removes at most 20 dB: restoration, not separation")
    exponent: float = Field(1.0, gt=0)
    click_threshold: float = Field(8.0, gt=0, description="clicks: residual above this many local deviations")
    click_max_ms: float = Field(2.0, gt=0, description="longest event treated as a click")
    clip_min_run: int = Field(3, ge=2, description="at least this many equal samples at the peak count as clipped")
    highpass_hz: float = Field(30.0, ge=0, description="gentle EQ: high-pass corner for DC and rumble; 0 = off")

    def context_seconds(self) -> float:
        return super().context_seconds() + 0.02  # de-click and de-clip look 10 ms and 16 samples around


# each method's params model, by the name an entry's `params.method` gives: all the registry needs of the family
METHOD_PARAMS: dict[str, type[_Params]] = {
    "centre": CentreParams,
    "hpss": HpssParams,
    "repet_sim": RepetSimParams,
    "wpe": WpeParams,
    "spectral_gate": GateParams,
    "universal_enhancer": EnhancerParams,
}
