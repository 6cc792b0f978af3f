// The demo page: one row per picked file, with progress, rate, ETA and cancel.
// window.demo.uploads mirrors each row's state for anyone watching (tests too).
import { ResumableUpload } from "/static/resumable-upload.js";

const params = new URLSearchParams(location.search);
const demo = { uploads: [] };
window.demo = demo;

const chunkSelect = document.getElementById("chunk");
if (params.has("chunk")) { // e.g. ?chunk=1048576, for small files that still show chunks
  const option = new Option(`${mib(Number(params.get("chunk")))}`, params.get("chunk"), true, true);
  chunkSelect.add(option);
}

document.getElementById("files").addEventListener("change", (event) => {
  for (const file of event.target.files) start(file);
  event.target.value = "";
});

function mib(bytes) {
  return bytes >= 1024 * 1024 ? `${(bytes / 1048576).toFixed(1)} MiB` : `${(bytes / 1024).toFixed(0)} KiB`;
}

function duration(seconds) {
  if (!Number.isFinite(seconds)) return "";
  if (seconds < 60) return `${Math.ceil(seconds)} s left`;
  return `${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s left`;
}

// Rate over the last few seconds, so a stall shows at once and a burst fades.
class RateMeter {
  constructor(window = 4000) { this.window = window; this.samples = []; }
  add(bytes) {
    const now = performance.now();
    this.samples.push([now, bytes]);
    while (this.samples.length > 2 && now - this.samples[0][0] > this.window) this.samples.shift();
    const [t0, b0] = this.samples[0];
    return now > t0 ? Math.max(0, (bytes - b0) / ((now - t0) / 1000)) : 0;
  }
}

function start(file) {
  const row = document.getElementById("row").content.firstElementChild.cloneNode(true);
  document.getElementById("uploads").append(row);
  const $ = (selector) => row.querySelector(selector);
  const name = document.getElementById("prefix").value + file.name;
  const entry = { name, size: file.size, percent: 0, state: "uploading", retries: 0,
                  resumes: [], chunks: [], delays: [], object: null, error: null };
  demo.uploads.push(entry);
  $(".name").textContent = name;
  $(".size").textContent = mib(file.size);
  const show = (state, status) => {
    entry.state = state;
    row.className = `upload ${state}`;
    $(".status").textContent = status;
  };
  const meter = new RateMeter();
  const began = performance.now();
  const upload = new ResumableUpload(file, {
    name,
    chunkSize: Number(chunkSelect.value),
    onProgress(sent, total) {
      const percent = total ? Math.floor((sent / total) * 100) : 100;
      entry.percent = percent;
      $(".fill").style.width = `${percent} %`.replace(" ", "");
      $(".percent").textContent = `${percent} %`;
      const rate = meter.add(sent);
      $(".rate").textContent = rate ? `${mib(rate)}/s` : "";
      $(".eta").textContent = rate ? duration((total - sent) / rate) : "";
      if (entry.state === "waiting") show("uploading", "uploading");
    },
    onRetry({ attempt, delay, error }) {
      entry.retries += 1;
      entry.delays.push(delay);
      $(".rate").textContent = "";
      $(".eta").textContent = "paused";
      show("waiting", `connection lost (${error.message}): retrying in ${delay.toFixed(1)} s` +
                      ` (attempt ${attempt})`);
    },
    onResume(offset) {
      entry.resumes.push(offset);
      show("uploading", `resumed at ${mib(offset)} of ${mib(file.size)}: the server kept what arrived`);
    },
    onChunk({ start: at }) { entry.chunks.push(at); },
  });
  $(".cancel").addEventListener("click", async () => {
    $(".cancel").disabled = true;
    entry.state = "cancelled";
    await upload.abort({ terminate: true });
    show("cancelled", "cancelled: the session was deleted on the server");
  });
  show("uploading", "uploading");
  upload.start().then((object) => {
    entry.object = object;
    entry.percent = 100;
    $(".fill").style.width = "100%";
    $(".percent").textContent = "100 %";
    $(".eta").textContent = "";
    const seconds = (performance.now() - began) / 1000;
    $(".rate").textContent = `${mib(object.size / seconds)}/s on average, ${seconds.toFixed(1)} s`;
    $(".cancel").disabled = true;
    const story = [];
    if (entry.retries) story.push(`${entry.retries} failed requests`);
    if (entry.resumes.length) story.push(`resumed at ${entry.resumes.map(mib).join(", ")}`);
    show("done", `done: ${mib(object.size)} stored as ${object.name}, crc32c ${object.crc32c} ` +
                 `matches the file${story.length ? ` (${story.join("; ")})` : ""}`);
  }, (error) => {
    if (entry.state === "cancelled") return;
    entry.error = error.message;
    show("failed", `failed: ${error.message}`);
  });
}
