"""Pure numpy/scipy separators (the `dsp` family): centre, HPSS, REPET-SIM, WPE, spectral gate, enhancer.

These are the fallbacks that run anywhere, without weights. `params.method` picks the
method; its other params are validated by that method's typed model below. Two-source
methods estimate one source and return the input minus it as the other, so a method's
outputs always sum back to its input.

Every STFT here uses a hop that divides the sample rate and the chunks' context is a whole
number of seconds, so when the engine cuts a track into chunks (whole seconds long) the
frame grid of a chunk coincides with the frame grid of the whole track; with enough
context the chunked output then equals the whole-signal output, not just resembles it.
Smoothing, minimum tracking and median filters are finite windows (no recursive
averages) for the same reason.

WPE and REPET-SIM look further than a chunk's context could reach (WPE's filters are
sums over every frame of the track; REPET-SIM compares frames a minute apart), so they
stream instead (`dry_stream`, `foreground_stream`): STFT frames are analysed from the
ranges of the signal they cover (`Stft.frames_of`), the frame-domain work runs on slabs
of frames with the context it needs (`around`) and a streaming overlap-add
(`Synthesis`) gives out samples as they become final. The output equals the
whole-signal functions' (`dry`, `foreground`, kept as the reference) within float
rounding, and memory follows the block and the method's reach, not the track.

One module a part: `grid` (the STFT grid and streaming synthesis), `features`, `params` (each
method's typed params, `METHOD_PARAMS`), one module per method (`centre`, `hpss`, `repet_sim`, `wpe`,
`gate`, `enhancer`), and `separator`, which maps method names to them and runs them. This package's
init imports none of them: the registry checks a DSP entry's params with `params` alone, so the API
and workers of other queues never import scipy.
"""
