// Resumable uploads from a browser to /upload/<name> (Content-Range dialect).
// An ES module without dependencies:
//
//   import { ResumableUpload } from "/static/resumable-upload.js";
//   const upload = new ResumableUpload(file, { name: "videos/a.mp4", onProgress });
//   const object = await upload.start();   // the object JSON, crc32c checked
//
// Chunks are PUT with "Content-Range: bytes a-b/total". After a network error
// or a 408/429/5xx the upload waits (Retry-After, else exponential backoff with
// jitter), asks the server how much it has ("bytes */total") and sends the
// rest. The session URL is kept in localStorage with a fingerprint of the
// file, so choosing the same file after a reload resumes where it stopped.

const QUANTUM = 256 * 1024; // non-final chunks are multiples of this (Google's rule)
export const DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024;
const DEFAULT_RETRY_DELAYS = [0.5, 1, 2, 4, 8, 15, 30, 30, 30, 30];
const STORAGE_PREFIX = "resumable-upload:";

export class UploadError extends Error {
  constructor(message, { status = 0, retryable = false, retryAfter = null } = {}) {
    super(message);
    this.name = "UploadError";
    this.status = status;
    this.retryable = retryable;
    this.retryAfter = retryAfter; // seconds, from the server's Retry-After
  }
}

export class ResumableUpload {
  constructor(file, options = {}) {
    this.file = file;
    this.name = options.name ?? file.name;
    this.endpoint = (options.endpoint ?? "").replace(/\/+$/, "");
    this.chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!(this.chunkSize > 0) || this.chunkSize % QUANTUM !== 0) {
      throw new RangeError(`chunkSize must be a positive multiple of ${QUANTUM} bytes`);
    }
    this.headers = options.headers ?? {};
    this.withCredentials = Boolean(options.withCredentials);
    this.retryDelays = options.retryDelays ?? DEFAULT_RETRY_DELAYS;
    this.contentType = options.contentType ?? (file.type || "application/octet-stream");
    this.metadata = options.metadata ?? null;
    this.verify = options.verify ?? true;
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.onProgress = options.onProgress ?? (() => {});
    this.onRetry = options.onRetry ?? (() => {});
    this.onResume = options.onResume ?? (() => {});
    this.onChunk = options.onChunk ?? (() => {});
    this.random = options.random ?? Math.random;
    this.url = null;
    this.offset = 0;
    this._xhr = null;
    this._wake = null;
    this._aborted = false;
  }

  get target() {
    const path = this.name.split("/").map(encodeURIComponent).join("/");
    return `${this.endpoint}/upload/${path}`;
  }

  /** Upload (or resume) the file; resolves with the server's object JSON. */
  async start() {
    this._aborted = false;
    const object = await this._run();
    if (this.verify) await this._verify(object);
    this._forget();
    return object;
  }

  /** Stop now. With terminate, also cancel the session on the server. */
  async abort({ terminate = false } = {}) {
    this._aborted = true;
    this._xhr?.abort();
    this._wake?.();
    if (terminate) {
      const url = this.url ?? this._saved()?.url;
      this._forget();
      if (url) await this._request("DELETE", url).catch(() => {});
    }
  }

  async _run() {
    let attempt = 0;
    let probe = false;
    for (;;) {
      const before = this.offset;
      try {
        const object = await this._step(probe);
        if (object) return object;
        probe = false;
      } catch (error) {
        if (this._aborted) throw new UploadError("upload aborted");
        if (!error.retryable || attempt >= this.retryDelays.length) throw error;
        const delay = error.retryAfter ?? this._backoff(attempt);
        attempt += 1;
        this.onRetry({ attempt, delay, error });
        await this._sleep(delay);
        if (this._aborted) throw new UploadError("upload aborted");
        probe = true;
      }
      if (this.offset > before) attempt = 0; // progress: the next failure starts over
    }
  }

  // One request: start or find the session, probe, or send one chunk.
  async _step(probe) {
    const size = this.file.size;
    if (this.url === null) {
      const saved = this._saved();
      if (saved) {
        this.url = saved.url;
        probe = true;
      } else {
        this.url = await this._initiate();
        this.offset = 0;
        this._remember();
      }
    }
    if (probe || size === 0) {
      const state = await this._probe();
      if (state.object) return state.object;
      if (state.missing) { // never created, cancelled or expired: start over
        this._forget();
        this.url = null;
        this.offset = 0;
        return null;
      }
      this.offset = state.offset;
      this.onResume(this.offset);
      this.onProgress(this.offset, size);
      return null;
    }
    const end = Math.min(this.offset + this.chunkSize, size);
    const from = this.offset;
    this.onChunk({ start: from, end });
    const answer = await this._request("PUT", this.url, {
      headers: { "Content-Range": `bytes ${from}-${end - 1}/${size}` },
      body: this.file.slice(from, end),
      progress: (loaded) => this.onProgress(from + loaded, size),
    });
    const state = this._state(answer);
    if (state.object) {
      this.onProgress(size, size);
      return state.object;
    }
    if (state.missing) throw new UploadError("the upload session is gone", { status: 404 });
    this.offset = state.offset;
    this.onProgress(this.offset, size);
    return null;
  }

  async _initiate() {
    const answer = await this._request("POST", this.target, {
      headers: {
        "X-Upload-Content-Length": String(this.file.size),
        "X-Upload-Content-Type": this.contentType,
        "Content-Type": "application/json; charset=utf-8",
      },
      body: JSON.stringify(this.metadata ? { metadata: this.metadata } : {}),
    });
    if (answer.status !== 200) throw failure(answer);
    return answer.header("Location") || this.target;
  }

  async _probe() {
    const answer = await this._request("PUT", this.url, {
      headers: { "Content-Range": `bytes */${this.file.size}` },
    });
    return this._state(answer);
  }

  // What an answer says about the upload: complete, missing, or stored up to an offset.
  _state(answer) {
    const override = answer.header("X-Http-Status-Code-Override");
    const incomplete = answer.status === 308 || (answer.status === 200 && override === "308");
    if (incomplete || answer.status === 409) {
      const match = /^bytes=0-(\d+)$/.exec(answer.header("Range") ?? "");
      return { offset: match ? Number(match[1]) + 1 : 0 };
    }
    if (answer.status === 200 || answer.status === 201) return { object: JSON.parse(answer.text) };
    if (answer.status === 404 || answer.status === 410) return { missing: true };
    throw failure(answer);
  }

  // One XMLHttpRequest (fetch cannot report upload progress), with the
  // header that makes the server send 200 instead of a 308 a browser might follow.
  _request(method, url, { headers = {}, body = null, progress = null } = {}) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      this._xhr = xhr;
      xhr.open(method, url);
      xhr.withCredentials = this.withCredentials;
      const all = { ...this.headers, "X-GUploader-No-308": "yes", ...headers };
      for (const [key, value] of Object.entries(all)) xhr.setRequestHeader(key, value);
      if (progress) xhr.upload.onprogress = (event) => progress(event.loaded);
      xhr.onload = () => resolve({
        status: xhr.status,
        text: xhr.responseText,
        header: (key) => xhr.getResponseHeader(key),
      });
      xhr.onerror = () => reject(new UploadError("network error", { retryable: true }));
      xhr.ontimeout = xhr.onerror;
      xhr.onabort = () => reject(new UploadError("upload aborted"));
      xhr.send(body);
    });
  }

  _backoff(attempt) {
    const base = this.retryDelays[Math.min(attempt, this.retryDelays.length - 1)];
    return base * (0.5 + this.random()); // jitter: clients cut together must not return together
  }

  _sleep(seconds) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, seconds * 1000);
      this._wake = () => { clearTimeout(timer); resolve(); };
    });
  }

  async _verify(object) {
    if (typeof object.crc32c !== "string") return;
    let crc = 0;
    const slice = 4 * 1024 * 1024;
    for (let at = 0; at < this.file.size; at += slice) {
      const bytes = new Uint8Array(await this.file.slice(at, at + slice).arrayBuffer());
      crc = crc32cUpdate(crc, bytes);
    }
    const mine = crc32cBase64(crc);
    if (mine !== object.crc32c) {
      throw new UploadError(`stored object's crc32c ${object.crc32c} differs from the file's ${mine}`);
    }
  }

  get fingerprint() {
    const f = this.file;
    return [f.name ?? "", f.size, f.lastModified ?? "", f.type].join("/");
  }

  _key() {
    return STORAGE_PREFIX + new URL(this.target, globalThis.location?.href).href;
  }

  _saved() {
    try {
      const saved = JSON.parse(this.storage?.getItem(this._key()) ?? "null");
      return saved && saved.fingerprint === this.fingerprint ? saved : null;
    } catch {
      return null; // storage disabled or a foreign value: start afresh
    }
  }

  _remember() {
    const entry = { url: this.url, fingerprint: this.fingerprint, created: Date.now() };
    try { this.storage?.setItem(this._key(), JSON.stringify(entry)); } catch { /* full or off */ }
  }

  _forget() {
    try { this.storage?.removeItem(this._key()); } catch { /* off */ }
  }
}

function defaultStorage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null; // sandboxed frames and some privacy modes forbid it: no resume across reloads
  }
}

function failure(answer) {
  let message = `HTTP ${answer.status}`;
  try {
    message = JSON.parse(answer.text).message ?? message;
  } catch { /* not JSON */ }
  const retryable = answer.status === 408 || answer.status === 429 || answer.status >= 500;
  return new UploadError(message, {
    status: answer.status, retryable, retryAfter: parseRetryAfter(answer.header("Retry-After")),
  });
}

export function parseRetryAfter(value) {
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup per byte.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

export function crc32cUpdate(crc, bytes) {
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

// Base64 of the big-endian value: the form of "crc32c" in the object JSON.
export function crc32cBase64(crc) {
  return btoa(String.fromCharCode(crc >>> 24, (crc >>> 16) & 0xff, (crc >>> 8) & 0xff, crc & 0xff));
}
