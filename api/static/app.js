// The stems page: sign in, bring audio in, pick a preset and a selection, follow the split, mix and download.

import { ApiError, call, callBlob, getBlob, poll, saveKey, savedKey, upload } from "/static/api.js";
import { Mixer } from "/static/mixer.js";
import { sourceWaveform } from "/static/waveform.js";

const $ = (id) => document.getElementById(id);
const CHIPS = 10;  // stem names shown on a preset card (mvsep_mega_53 has 53)
const GROUPS = { music: "Music", speech: "Speech", cleanup: "Clean-up", custom: "Prompt-guided" };

const state = { audio: null, source: null, selection: null, presets: [], preset: null, job: null, cursor: null,
                mastered: null };
const NI_STEMS = ["drums", "bass", "other", "vocals"];  // a split with these can be a DJ stem file
const mixer = new Mixer($("stems"), $("clock"), $("play-button"));
window.stems = { state, mixer };  // for the browser console

function show(id, text, kind = "error") {
  const node = $(id);
  node.hidden = !text;
  node.textContent = text || "";
  node.className = `message ${kind}`;
}

function errorText(exc) {
  return exc instanceof ApiError ? `${exc.message} (${exc.code})` : String(exc.message || exc);
}

function setProgress(id, fraction, label) {
  const node = $(id);
  node.hidden = false;
  node.querySelector(".bar").style.width = `${Math.round(100 * Math.max(0, Math.min(1, fraction)))}%`;
  node.querySelector(".label").textContent = label;
}

// -- sign-in ------------------------------------------------------------------------------
// `make up` prints /#key=...: the fragment never reaches a server or its logs; it is kept in
// localStorage and removed from the address bar at once.
function keyFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get("key");
  if (key) {
    saveKey(key);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

async function signIn(key) {
  saveKey(key);
  try {
    const catalogue = await call("GET", "/presets");
    show("signin-message", "");
    $("app").hidden = false;
    $("intro").hidden = true;
    $("signin-button").hidden = true;
    $("signout-button").hidden = false;
    $("key-input").value = key;
    renderPresets(catalogue);
    loadHistory(true);
  } catch (exc) {
    saveKey("");
    $("app").hidden = true;
    show("signin-message", `Sign-in failed: ${errorText(exc)}`);
  }
}

function signOut() {
  saveKey("");
  mixer.destroy();
  $("app").hidden = true;
  $("intro").hidden = false;
  $("signin-button").hidden = false;
  $("signout-button").hidden = true;
  $("key-input").value = "";
}

// -- bringing audio in --------------------------------------------------------------------
async function imported(accepted, name) {
  setProgress("upload-progress", 1, "importing…");
  const status = await poll(`/status/audio/${accepted.audio_id}`, ["complete", "failed"]);
  if (status.status === "failed") {
    $("upload-progress").hidden = true;
    show("source-message", `The audio was refused: ${status.error ? status.error.message : "unknown reason"}`);
    return;
  }
  $("upload-progress").hidden = true;
  state.audio = status;
  const peaks = await call("GET", `/audio/${status.audio_id}/peaks`);
  if (state.source) state.source.destroy();
  $("source").hidden = false;
  $("source-name").textContent = status.filename || name || status.audio_id;
  $("source-info").textContent =
    `${status.duration.toFixed(2)} s · ${status.sample_rate} Hz · ${status.channels} ch · ${status.codec}`;
  state.source = sourceWaveform($("source-waveform"), peaks, status.duration, selectionChanged);
  forgetMastered();
  selectionChanged(0, null);
  $("split-button").disabled = !state.preset;
}

async function bringIn(start) {
  show("source-message", "");
  try {
    await start();
  } catch (exc) {
    $("upload-progress").hidden = true;
    show("source-message", errorText(exc));
  }
}

function uploadFile(file) {
  bringIn(async () => {
    setProgress("upload-progress", 0, `uploading ${file.name}…`);
    const accepted = await upload(file, (sent, total) =>
      setProgress("upload-progress", sent / total, `uploading ${file.name}: ${Math.round(100 * sent / total)}%`));
    await imported(accepted, file.name);
  });
}

function importLink(url) {
  bringIn(async () => {
    setProgress("upload-progress", 0.5, `fetching ${url}…`);
    await imported(await call("POST", "/from-link", { url }), url.split("/").pop());
  });
}

// -- mastering: a mastered version of the audio, which can be split instead of the original -------------
function forgetMastered() {
  state.mastered = null;
  $("master-result").textContent = "";
  $("master-download").hidden = true;
  $("use-master-label").hidden = true;
  $("use-master").checked = false;
}

async function master() {
  show("source-message", "");
  forgetMastered();
  $("master-button").disabled = true;
  try {
    const queued = await call("POST", "/master-audio", { audio_id: state.audio.audio_id, preset: $("master-preset").value });
    $("master-result").textContent = "mastering…";
    const status = await poll(`/status/mastered/${queued.mastered_id}`, ["complete", "failed"]);
    if (status.status === "failed") {
      $("master-result").textContent = "";
      show("source-message", `The mastering failed: ${status.error ? status.error.message : "unknown reason"}`);
      return;
    }
    const m = status.measured;
    state.mastered = status;
    $("master-result").textContent = `${status.preset}: ${m.integrated_lufs.toFixed(1)} LUFS · ` +
      `${m.true_peak_dbtp.toFixed(1)} dBTP · LRA ${m.loudness_range_lu.toFixed(1)} LU`;
    $("master-download").hidden = false;
    $("use-master-label").hidden = false;
  } catch (exc) {
    $("master-result").textContent = "";
    show("source-message", errorText(exc));
  } finally {
    $("master-button").disabled = false;
  }
}

function save(blob, name) {
  const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
}

async function downloadMastered() {
  try {
    save(await getBlob(`/download/mastered/${state.mastered.mastered_id}`), `mastered-${state.mastered.preset}.wav`);
  } catch (exc) {
    show("source-message", errorText(exc));
  }
}

function selectionChanged(start, end) {
  const round = (x) => Math.round(x * 100) / 100;
  state.selection = end === null ? null : { start: round(start), end: round(Math.min(end, state.audio.duration)) };
  $("sel-start").value = state.selection ? state.selection.start : 0;
  $("sel-end").value = state.selection ? state.selection.end : round(state.audio.duration);
}

function selectionTyped() {
  const start = Number($("sel-start").value), end = Number($("sel-end").value);
  if (!(end > start) || start < 0) return;
  state.source.set(start, end);
  selectionChanged(start, end);
}

// -- presets ------------------------------------------------------------------------------
function renderPresets(catalogue) {
  state.presets = catalogue.presets;
  state.declaredUse = catalogue.declared_use;
  const root = $("presets");
  root.replaceChildren();
  const groups = [...new Set(catalogue.presets.map((p) => p.group))]
    .sort((a, b) => Object.keys(GROUPS).indexOf(a) - Object.keys(GROUPS).indexOf(b));
  for (const group of groups) {
    const box = document.createElement("div");
    box.className = "preset-group";
    box.append(Object.assign(document.createElement("h3"), { textContent: GROUPS[group] || group }));
    const members = catalogue.presets.filter((x) => x.group === group);
    for (const p of [...members.filter((x) => x.available), ...members.filter((x) => !x.available)]) box.append(presetCard(p));
    root.append(box);
  }
  const restoration = $("restoration");
  restoration.replaceChildren(new Option("none", ""));
  for (const r of catalogue.restoration_presets) restoration.append(new Option(`${r.name}: ${r.description}`, r.name));
}

function presetCard(p) {
  const label = document.createElement("label");
  label.className = `preset ${p.available ? "available" : "unavailable"}`;
  label.dataset.preset = p.name;
  const radio = Object.assign(document.createElement("input"), { type: "radio", name: "preset", value: p.name });
  radio.addEventListener("change", () => choosePreset(p));
  const title = Object.assign(document.createElement("span"), { className: "name", textContent: p.name });
  const desc = Object.assign(document.createElement("span"), { className: "desc", textContent: p.description });
  const stems = Object.assign(document.createElement("span"), { className: "stems" });
  const chip = (text) => Object.assign(document.createElement("span"), { className: "chip", textContent: text });
  for (const s of p.stems.slice(0, CHIPS)) stems.append(chip(s));
  if (p.stems.length > CHIPS) stems.append(chip(`+${p.stems.length - CHIPS} more`));
  stems.title = p.stems.join(", ");
  label.append(radio, title, desc, stems);
  const line = (cls, text) => Object.assign(document.createElement("span"), { className: cls, textContent: text });
  if (p.available) {
    // what serves it here, and plainly when that is signal processing rather than a trained model
    label.append(p.dsp_fallback
      ? line("served fallback", `DSP fallback (${p.chain.join(" + ")}): signal processing, not a trained model`)
      : line("served", `by ${p.chain.join(" + ")}`));
  } else {
    // the command first; which models are missing and the whole hint on demand
    const why = line("why", "Not available here. ");
    why.append(Object.assign(document.createElement("code"), { textContent: p.install_command || "stems models install" }));
    const more = document.createElement("details");
    more.append(Object.assign(document.createElement("summary"), { textContent: "details" }),
      line("hint", `No worker has ${p.missing_models.join(", ")}. ${p.install_hint || ""}`));
    why.append(more);
    label.append(why);
  }
  if (p.licence_refused && p.licence_refused.length) {
    label.append(line("why", `Skipped here, their licence does not allow ${state.declaredUse || "the declared"} use: ` +
      p.licence_refused.join(", ")));
  }
  return label;
}

function choosePreset(p) {
  state.preset = p;
  $("custom-fields").hidden = p.name !== "custom";
  $("split-button").disabled = !state.audio;
  show("split-message", p.available ? "" : `${p.name} is not available on this server; splitting will be refused.`, "warning");
}

// -- splitting ----------------------------------------------------------------------------
function spans(text) {
  if (!text.trim()) return undefined;
  return text.split(",").map((part) => {
    const [start, end] = part.split("-").map(Number);
    return { start, end };
  });
}

function request() {
  const body = {
    preset: state.preset.name, audio_id: state.audio.audio_id,
    bit_depth: Number($("bit-depth").value), hq_streaming_format: $("hq-format").value,
  };
  if (state.mastered && $("use-master").checked) {  // the same selection, of the mastered version
    delete body.audio_id;
    body.mastered_id = state.mastered.mastered_id;
  }
  if (state.selection) body.selection = state.selection;
  if ($("restoration").value) body.restoration_params = { preset: $("restoration").value, strength: Number($("strength").value) };
  if (state.preset.name === "custom") {
    Object.assign(body, { prompt: $("custom-prompt").value, sam_model: $("custom-sam-model").value,
                          stereo_mode: $("custom-stereo").value, spans: spans($("custom-spans").value) });
  }
  return body;
}

async function split() {
  show("split-message", "");
  let queued;
  try {
    queued = await call("POST", "/create-stems", request());
  } catch (exc) {
    show("split-message", errorText(exc));
    return;
  }
  loadHistory(true);
  follow(queued.creation_id, state.preset.name);
}

async function follow(creationId, preset) {
  state.job = creationId;
  mixer.destroy();
  $("mixer").hidden = true;
  $("job-section").hidden = false;
  $("job-title").textContent = `${preset} · ${creationId.slice(0, 8)}`;
  show("job-message", "");
  $("cancel-button").hidden = false;
  $("job-section").scrollIntoView({ behavior: "smooth", block: "start" });
  let status;
  try {
    status = await poll(`/status/stem_split/${creationId}`, ["complete", "failed", "cancelled"], (s) => {
      if (state.job !== creationId) throw new Error("superseded");
      setProgress("job-progress", s.progress, `${Math.round(100 * s.progress)}%`);
      $("job-stage").textContent = s.stage && s.stage !== s.status ? `${s.status}: ${s.stage}` : s.status;
      $("job-eta").textContent = s.eta_s != null ? `about ${Math.ceil(s.eta_s)} s left` : "";
    });
  } catch (exc) {
    if (exc.message !== "superseded") show("job-message", errorText(exc));
    return;
  }
  $("cancel-button").hidden = true;
  loadHistory(true);
  if (status.status === "failed") show("job-message", `The split failed: ${status.error ? status.error.message : ""}`);
  if (status.status === "cancelled") show("job-message", "The split was cancelled; its outputs were removed.", "warning");
  if (status.status !== "complete") return;
  $("mixer").hidden = false;
  $("stemfile-button").hidden = !NI_STEMS.every((n) => status.stems.some((s) => s.name === n));
  try {
    await mixer.load(status.stems);
  } catch (exc) {
    show("job-message", errorText(exc));
  }
}

async function cancel() {
  try {
    await call("POST", `/cancel/${state.job}`);
  } catch (exc) {
    show("job-message", errorText(exc));
  }
}

async function downloadZip() {
  try {
    save(await callBlob("POST", "/download-archive", { creation_id: state.job, format: "wav" }),
         `stems-${state.job.slice(0, 8)}.zip`);
  } catch (exc) {
    show("job-message", errorText(exc));
  }
}

async function downloadStemFile() {
  try {
    save(await callBlob("POST", "/download-archive", { creation_id: state.job, format: "stem.mp4" }),
         `stems-${state.job.slice(0, 8)}.stem.mp4`);
  } catch (exc) {
    show("job-message", errorText(exc));
  }
}

// -- history ------------------------------------------------------------------------------
async function loadHistory(reset) {
  if (reset) state.cursor = null;
  const query = new URLSearchParams({ limit: "10" });
  if (state.cursor) query.set("cursor", state.cursor);
  let page;
  try {
    page = await call("GET", `/stem_split?${query}`);
  } catch (exc) {
    return;  // the history is a convenience: the rest of the page works without it
  }
  const body = $("history").querySelector("tbody");
  if (reset) body.replaceChildren();
  for (const job of page.items) {
    const row = body.insertRow();
    row.dataset.creationId = job.creation_id;
    const when = new Date(job.created_at * 1000);
    for (const text of [when.toLocaleString(), job.filename || job.audio_id.slice(0, 8), job.preset, job.status]) {
      row.insertCell().textContent = text;
    }
    const open = Object.assign(document.createElement("button"), { type: "button", textContent: "Open" });
    open.addEventListener("click", () => follow(job.creation_id, job.preset));
    row.insertCell().append(open);
  }
  state.cursor = page.next_cursor;
  $("history-more").hidden = !page.next_cursor;
}

// -- wiring -------------------------------------------------------------------------------
function wire() {
  $("signin").addEventListener("submit", (e) => { e.preventDefault(); signIn($("key-input").value.trim()); });
  $("signout-button").addEventListener("click", signOut);
  const drop = $("dropzone");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) uploadFile(e.dataTransfer.files[0]);
  });
  $("file-input").addEventListener("change", (e) => e.target.files.length && uploadFile(e.target.files[0]));
  $("link-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("link-input").value.trim()) importLink($("link-input").value.trim());
  });
  $("sel-start").addEventListener("change", selectionTyped);
  $("sel-end").addEventListener("change", selectionTyped);
  $("sel-clear").addEventListener("click", () => state.source && state.source.clear());
  $("restoration").addEventListener("change", () => { $("strength-label").hidden = !$("restoration").value; });
  $("split-button").addEventListener("click", split);
  $("cancel-button").addEventListener("click", cancel);
  $("zip-button").addEventListener("click", downloadZip);
  $("stemfile-button").addEventListener("click", downloadStemFile);
  $("master-button").addEventListener("click", master);
  $("master-download").addEventListener("click", downloadMastered);
  $("history-more").addEventListener("click", () => loadHistory(false));
}

wire();
keyFromFragment();
if (savedKey()) signIn(savedKey());
