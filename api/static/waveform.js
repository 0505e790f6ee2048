// Waveforms from the API's precomputed peaks (audiowaveform JSON): nothing is downloaded and decoded to draw them.

import WaveSurfer from "/static/vendor/wavesurfer.esm.js";
import RegionsPlugin from "/static/vendor/regions.esm.js";

/** audiowaveform version 2 -> wavesurfer's peaks: per channel, the points' min and max in turn, in -1..1. */
export function toChannels(peaks) {
  const { channels, length, data, bits } = peaks;
  const scale = 2 ** (bits - 1);
  const out = [];
  for (let c = 0; c < Math.min(channels, 2); c++) {
    const ch = new Float32Array(2 * length);
    for (let i = 0; i < length; i++) {
      ch[2 * i] = data[(i * channels + c) * 2] / scale;
      ch[2 * i + 1] = data[(i * channels + c) * 2 + 1] / scale;
    }
    out.push(ch);
  }
  return out;
}

const STYLE = {
  height: 72, waveColor: "#6b8cce", progressColor: "#2c4f9e", cursorColor: "#e8e8e8",
  barWidth: 2, barGap: 1, barRadius: 1, normalize: false,
};

/** The source's waveform, with one draggable selection region; `onSelect(start, end | null)`. */
export function sourceWaveform(container, peaks, duration, onSelect) {
  const regions = RegionsPlugin.create();
  const ws = WaveSurfer.create({ ...STYLE, container, peaks: toChannels(peaks), duration, interact: false,
                                 plugins: [regions] });
  regions.enableDragSelection({ color: "rgba(255, 196, 0, 0.25)" });
  const only = (region) => {
    for (const other of regions.getRegions()) if (other !== region) other.remove();
  };
  regions.on("region-created", (region) => { only(region); onSelect(region.start, region.end); });
  regions.on("region-updated", (region) => onSelect(region.start, region.end));
  return {
    ws,
    region: () => regions.getRegions()[0] || null,
    set(start, end) {
      const region = regions.getRegions()[0];
      if (region) region.setOptions({ start, end });
      else regions.addRegion({ start, end, color: "rgba(255, 196, 0, 0.25)" });
    },
    clear() { regions.clearRegions(); onSelect(0, null); },
    destroy() { ws.destroy(); },
  };
}

/** A stem's player: its waveform from peaks, its audio streamed from `url` by the given <audio> element. */
export function stemPlayer(container, media, url, peaks, duration) {
  return WaveSurfer.create({ ...STYLE, height: 56, container, media, url, peaks: toChannels(peaks), duration });
}
