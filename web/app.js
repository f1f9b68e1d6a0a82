// moshi_mlx browser client.
//
// Microphone -> AudioWorklet "moshi-capture" (mono, 20 ms chunks) -> opus-recorder's encoder
// worker (resamples to 24 kHz, Opus, Ogg pages) -> WebSocket message 0x01.
// WebSocket 0x01 (Ogg/Opus pages) -> ogg-opus-decoder (48 kHz PCM) -> AudioWorklet
// "moshi-playback" (jitter buffer, resampling) -> speakers.
// 0x02 text goes to the transcript, 0x04 metadata to the status line, 0x05 errors to the user.
//
// URL flags: ?ec=0 / ?ns=0 / ?agc=0 turn off echo cancellation / noise suppression / auto gain
// (?rawmic=1 turns off all three), ?autoconnect=1 connects on load (for tests).
// Counters for tests and curious people: window.moshi.stats.

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
const PARAMS = ["text_temperature", "text_topk", "audio_temperature", "audio_topk", "seed"];
const STORAGE_KEY = "moshi_mlx.settings";
const MAX_WS_BUFFER = 256 * 1024; // bytes queued in the socket before mic pages are skipped

const query = new URLSearchParams(location.search);
function flag(name, fallback) {
  const v = query.get(name);
  if (v === null) return fallback;
  return !["0", "false", "off", "no"].includes(v.trim().toLowerCase());
}
const RAW_MIC = flag("rawmic", false);
const MIC_OPTIONS = {
  echoCancellation: flag("ec", !RAW_MIC),
  noiseSuppression: flag("ns", !RAW_MIC),
  autoGainControl: flag("agc", !RAW_MIC),
};

const $ = (id) => document.getElementById(id);
const ui = {
  body: document.body,
  connect: $("connect"),
  status: $("status"),
  message: $("message"),
  demoNote: $("demo-note"),
  model: $("model"),
  meterIn: $("meter-in"),
  meterOut: $("meter-out"),
  lag: $("lag"),
  transcript: $("transcript"),
  clear: $("clear"),
  form: $("settings"),
  resetSettings: $("reset-settings"),
};

const stats = {
  state: "idle",
  connects: 0,
  handshake: false,
  micChunks: 0,
  pagesSent: 0,
  bytesSent: 0,
  pagesSkipped: 0,
  audioMessagesIn: 0,
  bytesIn: 0,
  samplesDecoded: 0,
  decodeErrors: 0,
  samplesPlayed: 0,
  underruns: 0,
  bufferedMs: 0,
  textPieces: 0,
  transcriptChars: 0,
  inputRms: 0,
  maxInputRms: 0,
  outputRms: 0,
  maxOutputRms: 0,
  errors: [],
  serverInfo: null,
  serverStats: null,
  micOptions: MIC_OPTIONS,
};
window.moshi = { stats };

// ---------------------------------------------------------------------------------------------
// Small UI helpers
// ---------------------------------------------------------------------------------------------

function setState(state, text) {
  stats.state = state;
  ui.body.dataset.state = state;
  if (text !== undefined) ui.status.textContent = text;
  const busy = state === "starting" || state === "connecting" || state === "live";
  ui.connect.textContent = busy ? "Disconnect" : "Connect";
  ui.connect.disabled = state === "stopping";
  for (const input of ui.form.elements) input.disabled = busy;
}

function showMessage(text, kind = "error") {
  if (!text) {
    ui.message.hidden = true;
    ui.message.textContent = "";
    return;
  }
  ui.message.hidden = false;
  ui.message.className = kind === "error" ? "message" : "message info";
  ui.message.textContent = text;
  if (kind === "error") stats.errors.push(text);
}

function level(rms) {
  if (!(rms > 0)) return 0;
  const db = 20 * Math.log10(rms);
  return Math.max(0, Math.min(1, (db + 72) / 66)); // -72 dBFS .. -6 dBFS
}

let meterIn = 0;
let meterOut = 0;
function drawMeters() {
  ui.meterIn.style.width = `${Math.round(meterIn * 100)}%`;
  ui.meterOut.style.width = `${Math.round(meterOut * 100)}%`;
  requestAnimationFrame(drawMeters);
}
requestAnimationFrame(drawMeters);

let currentTurn = null;
function startTurn() {
  const placeholder = ui.transcript.querySelector(".placeholder");
  if (placeholder) placeholder.remove();
  const p = document.createElement("p");
  const head = document.createElement("span");
  head.className = "turn-head";
  head.textContent = `Conversation at ${new Date().toLocaleTimeString()}`;
  p.append(head, document.createTextNode(""));
  ui.transcript.append(p);
  currentTurn = p.lastChild;
}
function addText(piece) {
  if (!currentTurn) startTurn();
  const atBottom = ui.transcript.scrollHeight - ui.transcript.scrollTop - ui.transcript.clientHeight < 30;
  let text = piece;
  if (currentTurn.data.length === 0) text = text.replace(/^\s+/, "");
  currentTurn.data += text;
  stats.textPieces++;
  stats.transcriptChars += text.length;
  if (atBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}");
    for (const name of PARAMS) if (saved[name] !== undefined) ui.form.elements[name].value = saved[name];
  } catch (e) {
    /* storage unavailable or corrupt: keep the blanks */
  }
}
function saveSettings() {
  const values = {};
  for (const name of PARAMS) values[name] = ui.form.elements[name].value;
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(values));
  } catch (e) {
    /* private mode */
  }
}
function settingsQuery() {
  const params = new URLSearchParams();
  for (const name of PARAMS) {
    const input = ui.form.elements[name];
    const value = input.value.trim();
    if (value === "") continue;
    if (!input.checkValidity()) throw new Error(`Setting "${input.parentElement.firstChild.textContent.trim()}" is not valid.`);
    if (name === "seed") {
      // Kyutai's clients send one seed per stream; this server uses a single seed for both.
      params.set("text_seed", value);
      params.set("audio_seed", value);
    } else {
      params.set(name, value);
    }
  }
  return params;
}
function showDefaults(defaults) {
  if (!defaults) return;
  for (const name of PARAMS) {
    const v = defaults[name];
    if (v !== undefined && v !== null) ui.form.elements[name].placeholder = String(v);
  }
}

// ---------------------------------------------------------------------------------------------
// One conversation
// ---------------------------------------------------------------------------------------------

class Session {
  constructor() {
    this.ctx = null;
    this.stream = null;
    this.capture = null;
    this.playback = null;
    this.source = null;
    this.encoder = null;
    this.decoder = null;
    this.ws = null;
    this.streaming = false;
    this.userStopped = false;
    this.closed = false;
    this.busy = false;
    this.serverError = null;
    this.decodeChain = Promise.resolve();
  }

  async start() {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new UserError(
        "The browser only allows the microphone on a secure page: open this page as http://localhost:… " +
          "on the computer running the server, or start the server with --ssl.",
      );
    }
    const AudioCtx = window.AudioContext || window.webkitAudioContext;
    if (!AudioCtx || !("audioWorklet" in AudioCtx.prototype)) {
      throw new UserError("This browser lacks the Web Audio features needed here (AudioWorklet). Try a current Chrome, Firefox or Safari.");
    }
    if (!window["ogg-opus-decoder"]) throw new UserError("The Opus decoder failed to load (vendor/ogg-opus-decoder.min.js).");

    // Create and resume the context while still inside the click (Safari insists).
    this.ctx = new AudioCtx({ latencyHint: "interactive" });
    const resumed = this.ctx.resume();

    setState("starting", "Asking for the microphone…");
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { ...MIC_OPTIONS, channelCount: { ideal: 1 } },
        video: false,
      });
    } catch (e) {
      throw micError(e);
    }
    if (this.closed) {
      for (const t of this.stream.getTracks()) t.stop(); // stopped while the browser was asking
      return;
    }
    await resumed;
    setState("starting", "Preparing audio…");
    await this.ctx.audioWorklet.addModule("audio-worklets.js");
    this.decoder = new window["ogg-opus-decoder"].OggOpusDecoder();
    await Promise.all([this.decoder.ready, this.startEncoder()]);
    if (this.closed) return;

    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.capture = new AudioWorkletNode(this.ctx, "moshi-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { chunkMs: 20 },
    });
    this.capture.port.onmessage = (e) => this.onMicChunk(e.data);
    this.source.connect(this.capture);
    this.capture.connect(this.ctx.destination); // outputs silence; keeps the node running everywhere
    this.playback = new AudioWorkletNode(this.ctx, "moshi-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { startMs: 120, maxStartMs: 400, maxMs: 1000, sourceRate: 48000 },
    });
    this.playback.port.onmessage = (e) => this.onPlaybackStats(e.data);
    this.playback.connect(this.ctx.destination);

    setState("connecting", "Connecting to Moshi…");
    this.openSocket();
  }

  startEncoder() {
    return new Promise((resolve, reject) => {
      const worker = new Worker("vendor/encoderWorker.min.js");
      this.encoder = worker;
      let ready = false;
      let tries = 0;
      const init = () =>
        worker.postMessage({
          command: "init",
          encoderSampleRate: 24000,
          originalSampleRate: this.ctx.sampleRate,
          numberOfChannels: 1,
          encoderApplication: 2048, // VOIP: tuned for speech
          encoderFrameSize: 20,
          maxFramesPerPage: 2, // a page every 40 ms keeps the added latency small
          resampleQuality: 3,
        });
      worker.onmessage = (e) => {
        const data = e.data;
        if (data && data.message === "ready") {
          ready = true;
          resolve();
        } else if (data && data.message === "page") {
          this.sendPage(data.page);
        }
      };
      worker.onerror = (e) => {
        e.preventDefault();
        // The WASM runtime may still be starting when "init" arrives: try again a few times.
        if (!ready && tries++ < 40) {
          setTimeout(init, 50);
        } else if (!ready) {
          reject(new UserError(`The Opus encoder failed to start: ${e.message || "unknown error"}`));
        } else {
          this.fail(`The Opus encoder failed: ${e.message || "unknown error"}`);
        }
      };
      init();
    });
  }

  wsUrl() {
    const params = settingsQuery();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const qs = params.toString();
    return `${scheme}//${location.host}/api/chat${qs ? "?" + qs : ""}`;
  }

  openSocket() {
    const ws = new WebSocket(this.wsUrl());
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    stats.connects++;
    ws.onmessage = (e) => this.onMessage(e.data);
    ws.onclose = (e) => this.onClose(e);
    ws.onerror = () => {}; // onclose follows and says what happened
  }

  onMessage(data) {
    if (!(data instanceof ArrayBuffer) || data.byteLength === 0) return;
    const bytes = new Uint8Array(data);
    const kind = bytes[0];
    const payload = bytes.subarray(1);
    switch (kind) {
      case KIND.HANDSHAKE:
        if (!stats.handshake) {
          stats.handshake = true;
          startTurn();
          setState("live", "Connected: talk to Moshi");
          // Header pages first, then the microphone.
          this.encoder.postMessage({ command: "getHeaderPages" });
          this.streaming = true;
        }
        break;
      case KIND.AUDIO:
        stats.audioMessagesIn++;
        stats.bytesIn += payload.length;
        this.decode(payload.slice());
        break;
      case KIND.TEXT:
        addText(new TextDecoder().decode(payload));
        break;
      case KIND.METADATA:
        try {
          this.onMetadata(JSON.parse(new TextDecoder().decode(payload)));
        } catch (e) {
          /* not JSON: ignore */
        }
        break;
      case KIND.ERROR: {
        const text = new TextDecoder().decode(payload);
        if (/^busy/i.test(text)) {
          this.busy = true;
        } else {
          this.serverError = text;
          if (stats.handshake) showMessage(`Server: ${text}`);
          else stats.errors.push(text);
        }
        break;
      }
      default:
        break; // control, ping and unknown kinds
    }
  }

  onMetadata(meta) {
    if (meta.type === "info") {
      stats.serverInfo = meta;
      ui.model.textContent = meta.model || "";
      ui.demoNote.hidden = !meta.demo;
      const ignored = Object.keys(meta.ignored_params || {});
      if (ignored.length) console.info("server ignored parameters:", meta.ignored_params);
    } else if (meta.type === "stats") {
      stats.serverStats = meta;
      this.renderLag();
    }
  }

  renderLag() {
    const s = stats.serverStats;
    const parts = [];
    if (s) {
      parts.push(`model lag ${Math.round(s.latency_ms)} ms`);
      if (s.step_ms) parts.push(`step ${Math.round(s.step_ms)} ms`);
      if (s.dropped_in) parts.push(`skipped ${s.dropped_in} of your frames`);
      if (s.dropped_out) parts.push(`${s.dropped_out} frames not sent`);
    }
    parts.push(`playback buffer ${Math.round(stats.bufferedMs)} ms`);
    if (stats.underruns) parts.push(`${stats.underruns} gaps`);
    ui.lag.textContent = parts.join(" · ");
    ui.lag.classList.toggle("behind", Boolean(s && (s.behind || s.dropped_in)));
  }

  decode(bytes) {
    // Keep decodes in order; a failure resets the decoder rather than ending the conversation.
    this.decodeChain = this.decodeChain
      .then(() => (this.decoder ? this.decoder.decode(bytes) : null))
      .then((out) => {
        if (!out || this.closed) return;
        if (out.errors && out.errors.length) stats.decodeErrors += out.errors.length;
        if (out.samplesDecoded > 0 && this.playback) {
          const samples = out.channelData[0].slice(0, out.samplesDecoded);
          stats.samplesDecoded += out.samplesDecoded;
          this.playback.port.postMessage({ type: "audio", samples, sampleRate: out.sampleRate }, [samples.buffer]);
        }
      })
      .catch(async (e) => {
        stats.decodeErrors++;
        console.warn("decode failed", e);
        try {
          if (this.decoder) await this.decoder.reset();
        } catch (e2) {
          /* ignore */
        }
      });
  }

  onMicChunk(data) {
    if (data.type !== "audio") return;
    stats.inputRms = data.rms;
    stats.maxInputRms = Math.max(stats.maxInputRms, data.rms);
    meterIn = level(data.rms);
    if (!this.streaming || !this.encoder) return;
    stats.micChunks++;
    this.encoder.postMessage({ command: "encode", buffers: [data.samples] }, [data.samples.buffer]);
  }

  sendPage(page) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (ws.bufferedAmount > MAX_WS_BUFFER) {
      stats.pagesSkipped++; // the network is stuck: skip rather than pile up
      return;
    }
    const msg = new Uint8Array(page.length + 1);
    msg[0] = KIND.AUDIO;
    msg.set(page, 1);
    ws.send(msg);
    stats.pagesSent++;
    stats.bytesSent += msg.length;
  }

  onPlaybackStats(s) {
    if (s.type !== "stats") return;
    stats.outputRms = s.rms;
    stats.maxOutputRms = Math.max(stats.maxOutputRms, s.rms);
    stats.samplesPlayed = s.played;
    stats.underruns = s.underruns;
    stats.bufferedMs = s.bufferedMs;
    meterOut = level(s.rms);
    if (stats.state === "live") this.renderLag();
  }

  onClose(e) {
    if (this.userStopped || (this.closed && session !== this)) return;
    const wasLive = stats.handshake;
    let message = null;
    if (this.busy) {
      message = "Moshi is busy with another conversation (another tab or person). Try again when it ends.";
    } else if (this.serverError) {
      message = `The server ended the conversation: ${this.serverError}`;
    } else if (!wasLive) {
      message = "Could not connect to the Moshi server. Is it still running?";
    } else if (e.code === 1001) {
      message = "The Moshi server was stopped.";
    } else {
      message = `Connection to the server was lost${e.code && e.code !== 1006 ? ` (code ${e.code})` : ""}.`;
    }
    this.teardown();
    if (message) {
      setState("error", wasLive ? "Disconnected" : "Not connected");
      showMessage(message);
    } else {
      setState("idle", "Not connected");
    }
  }

  fail(message) {
    if (this.closed) return;
    this.teardown();
    setState("error", "Stopped");
    showMessage(message);
  }

  stop() {
    this.userStopped = true;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) {
      this.ws.close(1000, "bye");
      // onclose finishes the teardown; do not wait for it to release the microphone.
    }
    this.teardown();
    setState("idle", "Not connected");
  }

  teardown() {
    if (this.closed) return;
    this.closed = true;
    this.streaming = false;
    if (session === this) session = null;
    stats.handshake = false;
    meterIn = meterOut = 0;
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    for (const node of [this.source, this.capture, this.playback]) {
      if (!node) continue;
      try {
        node.disconnect();
      } catch (e) {
        /* already */
      }
      if (node.port) node.port.postMessage("stop");
    }
    if (this.encoder) this.encoder.terminate();
    if (this.decoder) {
      const d = this.decoder;
      this.decoder = null;
      this.decodeChain.finally(() => d.free());
    }
    if (this.ctx && this.ctx.state !== "closed") this.ctx.close().catch(() => {});
    if (this.ws && this.ws.readyState <= WebSocket.OPEN && !this.userStopped) this.ws.close();
  }
}

class UserError extends Error {}

function micError(e) {
  const name = e && e.name;
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return new UserError(
      "Microphone access was denied. Allow it for this page (the icon in the address bar, or the browser's site settings) and connect again.",
    );
  }
  if (name === "NotFoundError" || name === "DevicesNotFoundError" || name === "OverconstrainedError") {
    return new UserError("No microphone was found. Plug one in (or pick one in the system settings) and connect again.");
  }
  if (name === "NotReadableError" || name === "AbortError") {
    return new UserError("The microphone is in use by another application or could not be opened.");
  }
  return new UserError(`Could not open the microphone: ${(e && e.message) || e}`);
}

// ---------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------

let session = null;

async function connect() {
  showMessage(null);
  stats.handshake = false;
  const s = new Session();
  session = s;
  ui.lag.textContent = "";
  try {
    await s.start();
  } catch (e) {
    if (s.userStopped) return; // the user pressed Disconnect while we were starting
    console.error(e);
    s.teardown();
    setState("error", "Not connected");
    showMessage(e instanceof UserError ? e.message : `Could not start: ${(e && e.message) || e}`);
  }
}

ui.connect.addEventListener("click", () => {
  if (session) session.stop();
  else connect();
});
ui.clear.addEventListener("click", () => {
  ui.transcript.textContent = "";
  currentTurn = null;
  if (session && stats.handshake) startTurn();
});
ui.form.addEventListener("input", saveSettings);
ui.form.addEventListener("submit", (e) => e.preventDefault());
ui.resetSettings.addEventListener("click", () => {
  for (const name of PARAMS) ui.form.elements[name].value = "";
  saveSettings();
});

async function init() {
  loadSettings();
  setState("idle", "Not connected");
  try {
    const info = await (await fetch("api/info", { cache: "no-store" })).json();
    ui.model.textContent = info.model || "";
    ui.demoNote.hidden = !info.demo;
    showDefaults(info.defaults);
    if (info.busy) showMessage("Another conversation is in progress; you can connect when it ends.", "info");
  } catch (e) {
    showMessage("The Moshi server does not answer. Is it running?");
  }
  ui.connect.disabled = false;
  if (flag("autoconnect", false)) connect();
}

init();
