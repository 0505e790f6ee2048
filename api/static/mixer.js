// The mixer: one waveform player per finished stem, played in sync, with solo, mute and volume per stem.

import { call } from "/static/api.js";
import { stemPlayer } from "/static/waveform.js";

const DRIFT_S = 0.06;  // a player further than this from the first one is moved back in step

export function formatTime(t) {
  const m = Math.floor(t / 60);
  return `${m}:${(t - 60 * m).toFixed(1).padStart(4, "0")}`;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/** Short-lived URLs (POST /download-links): media elements and links cannot send the key header. */
async function links(stems, format) {
  if (!stems.length) return {};
  const answer = await call("POST", "/download-links", { stem_ids: stems.map((s) => s.stem_id), format });
  return Object.fromEntries(answer.links.map((l) => [l.stem_id, l.url]));
}

export class Mixer {
  constructor(root, clock, playButton) {
    this.root = root;
    this.clock = clock;
    this.playButton = playButton;
    this.players = [];
    this.timer = null;
    playButton.addEventListener("click", () => this.toggle());
  }

  async load(stems) {
    this.destroy();
    const done = stems.filter((s) => s.status === "complete");
    const [wav, hq, peaks] = await Promise.all([
      links(done, "wav"), links(done.filter((s) => s.download && s.download.hq), "hq"),
      Promise.all(done.map((s) => call("GET", `/stem/${s.stem_id}/peaks`))),
    ]);
    done.forEach((stem, i) => this.add(stem, wav[stem.stem_id], hq[stem.stem_id], peaks[i]));
    this.apply();
    this.tick();
  }

  add(stem, wavUrl, hqUrl, peaks) {
    const media = el("audio", { preload: "auto" });
    const wave = el("div", { className: "waveform" });
    const solo = el("button", { type: "button", className: "solo", textContent: "S", title: "solo" });
    const mute = el("button", { type: "button", className: "mute", textContent: "M", title: "mute" });
    const volume = el("input", { type: "range", min: 0, max: 1, step: 0.01, value: 1, className: "volume",
                                 title: "volume" });
    const downloads = el("span", { className: "downloads" },
      el("a", { href: wavUrl, download: `${stem.name}.wav`, textContent: "WAV", className: "download-wav" }));
    if (hqUrl) {
      downloads.append(el("a", { href: hqUrl, download: "", textContent: stem.hq_format.toUpperCase(),
                                 className: "download-hq" }));
    }
    const row = el("div", { className: "stem" },
      el("div", { className: "stem-head" }, el("strong", { textContent: stem.name }),
        el("small", { textContent: stem.made_by || "" }), solo, mute, volume, downloads),
      wave, media);
    row.dataset.stem = stem.name;
    this.root.append(row);
    const ws = stemPlayer(wave, media, wavUrl, peaks, stem.duration);
    const player = { stem, row, media, ws, solo: false, mute: false, volume: 1 };
    solo.addEventListener("click", () => { player.solo = !player.solo; this.apply(); });
    mute.addEventListener("click", () => { player.mute = !player.mute; this.apply(); });
    volume.addEventListener("input", () => { player.volume = Number(volume.value); this.apply(); });
    ws.on("interaction", (t) => this.seek(t));
    ws.on("finish", () => { if (player === this.players[0]) this.stop(); });
    let retried = false;  // a link that expired while the page stayed open: ask for a fresh one once
    media.addEventListener("error", async () => {
      if (retried) return;
      retried = true;
      const fresh = await links([stem], "wav");
      media.src = fresh[stem.stem_id];
    });
    this.players.push(player);
  }

  /** Solo wins over mute: with any stem soloed, only the soloed ones sound. */
  apply() {
    const soloing = this.players.some((p) => p.solo);
    for (const p of this.players) {
      const silent = p.mute || (soloing && !p.solo);
      p.ws.setMuted(silent);
      p.ws.setVolume(p.volume);
      p.row.classList.toggle("silent", silent);
      p.row.querySelector(".solo").classList.toggle("on", p.solo);
      p.row.querySelector(".mute").classList.toggle("on", p.mute);
    }
  }

  playing() {
    return this.players.length > 0 && this.players[0].ws.isPlaying();
  }

  async toggle() {
    if (!this.players.length) return;
    if (this.playing()) {
      this.players.forEach((p) => p.ws.pause());
      this.playButton.textContent = "Play";
      return;
    }
    const t = this.players[0].ws.getCurrentTime();
    this.players.forEach((p) => p.ws.setTime(t));
    await Promise.all(this.players.map((p) => p.ws.play()));
    this.playButton.textContent = "Pause";
  }

  stop() {
    this.players.forEach((p) => { p.ws.pause(); p.ws.setTime(0); });
    this.playButton.textContent = "Play";
  }

  seek(t) {
    this.players.forEach((p) => { if (Math.abs(p.ws.getCurrentTime() - t) > 0.001) p.ws.setTime(t); });
  }

  /** The clock, and the players kept in step with the first (media elements drift apart by a few ms a minute). */
  tick() {
    const step = () => {
      if (!this.players.length) return;
      const lead = this.players[0].ws;
      const t = lead.getCurrentTime();
      this.clock.textContent = `${formatTime(t)} / ${formatTime(lead.getDuration() || 0)}`;
      if (lead.isPlaying()) {
        for (const p of this.players.slice(1)) {
          if (Math.abs(p.ws.getCurrentTime() - t) > DRIFT_S) p.ws.setTime(t);
        }
      }
      this.timer = setTimeout(step, 250);
    };
    step();
  }

  destroy() {
    clearTimeout(this.timer);
    this.players.forEach((p) => p.ws.destroy());
    this.players = [];
    this.root.replaceChildren();
    this.playButton.textContent = "Play";
  }
}
