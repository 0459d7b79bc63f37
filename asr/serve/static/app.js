// The asr-serve page: microphone -> AudioWorklet -> 16-bit PCM over the rich WebSocket protocol
// (/stream), partials and finals shown as they come; a dropped file goes to POST /transcribe.
// Plain JS, no build step. A server started with --token needs the page opened as /?token=T.
"use strict";

const SERVER_RATE = 16000;  // the model's rate: the browser resamples the microphone to it
const BLOCK_SECONDS = 0.1;  // audio per WebSocket message
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);

let segments = [];  // {text, start, end} of every final, in order
let live = null;    // the running microphone session: {ws, ctx, stream, node, offset}

function setStatus(text) { $("status").textContent = text; }

function clock(seconds, sep) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const pad = (v, n) => String(v).padStart(n, "0");
  return `${pad(Math.floor(ms / 3600000), 2)}:${pad(Math.floor(ms / 60000) % 60, 2)}:` +
         `${pad(Math.floor(ms / 1000) % 60, 2)}${sep}${pad(ms % 1000, 3)}`;
}

function addFinal(seg) {
  segments.push(seg);
  const p = document.createElement("p");
  const t = document.createElement("span");
  t.className = "time";
  t.textContent = clock(seg.start, ".").slice(3, 8);  // mm:ss
  p.append(t, document.createTextNode(seg.text));
  $("finals").append(p);
  $("download-txt").disabled = $("download-srt").disabled = false;
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/plain;charset=utf-8" }));
  const a = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function toSrt(segs) {
  // a cue shows at least a second (CTC word ends are early), never past the next cue's start
  return segs.map((s, i) => {
    const next = segs[i + 1] ? segs[i + 1].start : Infinity;
    const end = Math.max(s.end, Math.min(s.start + 1.0, next));
    return `${i + 1}\n${clock(s.start, ",")} --> ${clock(end, ",")}\n${s.text}\n`;
  }).join("\n");
}

function socketUrl(path) {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${path}${token ? "?token=" + encodeURIComponent(token) : ""}`;
}

function onMessage(event, offset) {
  const msg = JSON.parse(event.data);
  if (msg.type === "ready") setStatus(`listening (${msg.sample_rate} Hz)`);
  else if (msg.type === "partial") $("partial").textContent = msg.text;
  else if (msg.type === "final") {
    $("partial").textContent = "";
    if (msg.text) addFinal({ text: msg.text, start: msg.start + offset, end: msg.end + offset });
  } else if (msg.type === "done") setStatus(`done: ${msg.segments} segment(s), ${msg.duration.toFixed(1)} s`);
  else if (msg.error) setStatus(`error: ${msg.error}`);
}

async function openContext(stream) {
  // Chrome resamples a MediaStream into a context of any rate; Firefox refuses to connect a
  // stream to a context whose rate differs from the device's: then send at the device's rate
  // and let the server resample (exactly) to 16 kHz.
  try {
    const ctx = new AudioContext({ sampleRate: SERVER_RATE });
    return { ctx, source: ctx.createMediaStreamSource(stream) };
  } catch (err) {
    const ctx = new AudioContext();
    return { ctx, source: ctx.createMediaStreamSource(stream) };
  }
}

async function start() {
  $("start").disabled = true;
  setStatus("asking for the microphone…");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia(
      { audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  } catch (err) {
    setStatus(`no microphone: ${err.message || err.name}`);
    $("start").disabled = false;
    return;
  }
  const { ctx, source } = await openContext(stream);
  await ctx.audioWorklet.addModule("/static/pcm-worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm-sender",
    { processorOptions: { blockSamples: Math.round(ctx.sampleRate * BLOCK_SECONDS) } });
  const ws = new WebSocket(socketUrl("/stream"));
  ws.binaryType = "arraybuffer";
  const offset = segments.length ? segments[segments.length - 1].end : 0;  // times continue after earlier finals
  live = { ws, ctx, stream, node };
  ws.onmessage = (e) => onMessage(e, offset);
  ws.onclose = (e) => {
    if (e.code !== 1000) setStatus(`connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    stopAudio();
    $("start").disabled = false;
    $("stop").disabled = true;
  };
  ws.onopen = () => {
    ws.send(JSON.stringify({ config: { sample_rate: ctx.sampleRate } }));
    node.port.onmessage = (e) => { if (ws.readyState === WebSocket.OPEN) ws.send(e.data); };
    source.connect(node);
    node.connect(ctx.destination);  // the node outputs silence; connected so that it is pulled
    $("stop").disabled = false;
  };
}

function stopAudio() {
  if (!live) return;
  live.stream.getTracks().forEach((t) => t.stop());
  live.node.port.onmessage = null;
  live.node.disconnect();
  live.ctx.close();
}

function stop() {
  if (!live) return;
  stopAudio();
  if (live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify({ eof: 1 }));
  setStatus("finishing…");
  $("stop").disabled = true;
}

async function transcribeFile(file) {
  setStatus(`transcribing ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  try {
    const response = await fetch("/transcribe", { method: "POST", body: form, headers });
    const result = await response.json();
    if (!response.ok) { setStatus(`error: ${result.error}`); return; }
    const offset = segments.length ? segments[segments.length - 1].end : 0;
    result.segments.forEach((s) => addFinal({ text: s.text, start: s.start + offset, end: s.end + offset }));
    setStatus(`${file.name}: ${result.duration.toFixed(1)} s transcribed`);
  } catch (err) {
    setStatus(`error: ${err.message || err}`);
  }
}

$("start").onclick = start;
$("stop").onclick = stop;
$("clear").onclick = () => {
  segments = [];
  $("finals").textContent = $("partial").textContent = "";
  $("download-txt").disabled = $("download-srt").disabled = true;
};
$("download-txt").onclick = () => download("transcript.txt", segments.map((s) => s.text).join("\n") + "\n");
$("download-srt").onclick = () => download("transcript.srt", toSrt(segments));
$("file").onchange = (e) => { if (e.target.files[0]) transcribeFile(e.target.files[0]); };
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) transcribeFile(e.dataTransfer.files[0]);
};
