// The page's one door to the HTTP API: the key header, JSON in and out, and the API's errors.

const KEY_STORE = "stems.apiKey";

export function savedKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

export function saveKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

/** An error answer of the API: `message` is its `detail`, `code` and `fields` its other members. */
export class ApiError extends Error {
  constructor(status, body) {
    super(describe(body, status));
    this.status = status;
    this.code = (body && body.code) || `http_${status}`;
    this.fields = body || {};
  }
}

function describe(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail) && detail.length) {  // FastAPI's request validation errors
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
  }
  return `the server answered ${status}`;
}

async function parse(response) {
  const text = await response.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return { detail: text.slice(0, 300) };
  }
}

export async function call(method, path, body) {
  const headers = { "x-api-key": savedKey() };
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (exc) {
    throw new ApiError(0, { detail: `the API did not answer (${exc.message})`, code: "network" });
  }
  const data = await parse(response);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** The response as a Blob (a zip), with the API's error when it refuses. */
export async function callBlob(method, path, body) {
  const response = await fetch(path, {
    method, headers: { "x-api-key": savedKey(), "content-type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new ApiError(response.status, await parse(response));
  return response.blob();
}

/** A GET answered with a file (a mastered WAV), as a Blob. */
export async function getBlob(path) {
  const response = await fetch(path, { headers: { "x-api-key": savedKey() } });
  if (!response.ok) throw new ApiError(response.status, await parse(response));
  return response.blob();
}

/** POST /from-file with upload progress (fetch cannot report it; XMLHttpRequest can). */
export function upload(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/from-file");
    xhr.setRequestHeader("x-api-key", savedKey());
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded, e.total);
    xhr.onerror = () => reject(new ApiError(0, { detail: "the upload was interrupted", code: "network" }));
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { data = { detail: xhr.responseText.slice(0, 300) }; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, data));
    };
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `path` until its status is one of `done`; `onStatus` sees every answer. */
export async function poll(path, done, onStatus = () => {}, interval = 400) {
  for (;;) {
    let status;
    try {
      status = await call("GET", path);
    } catch (exc) {
      if (!(exc instanceof ApiError) || ![429, 503].includes(exc.status)) throw exc;
      await sleep(1000 * (Number(exc.fields.retry_after) || 5));  // the API said when to come back
      continue;
    }
    onStatus(status);
    if (done.includes(status.status)) return status;
    await sleep(interval);
    interval = Math.min(2000, interval * 1.25);
  }
}
