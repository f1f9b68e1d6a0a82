// moshi_mlx browser client.
//
// Microphone -> AudioWorklet "moshi-capture" (mono, 20 ms chunks) -> opus-recorder's encoder
// worker (resamples to 24 kHz, Opus, Ogg pages) -> WebSocket message 0x01.
// WebSocket 0x01 (Ogg/Opus pages) -> ogg-opus-decoder (48 kHz PCM) -> AudioWorklet
// "moshi-playback" (jitter buffer, resampling) -> speakers.
// 0x02 text goes to the transcript, 0x04 metadata to the status line, 0x05 errors to the user.
// 0x08 (ours: asked for with user_words=1) carries the user's words from a server run with
// --transcribe-user; they go to the transcript as "you:" turns beside Moshi's "moshi:" ones.
// Each conversation is recorded in the page (recorder.js): both voices as heard and the timed
// transcript, offered as files during and after it. Nothing is uploaded.
//
// URL flags: ?ec=0 / ?ns=0 / ?agc=0 turn off echo cancellation / noise suppression / auto gain
// (?rawmic=1 turns off all three), ?autoconnect=1 connects on load (for tests).
// Counters for tests and curious people: window.moshi.stats.

import { ConversationRecording } from "./recorder.js";
import { RecordingJournal, lastUnsaved, markSaved } from "./recording-store.js";

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6, USER_WORDS: 8 };
const STORAGE_KEY = "moshi_mlx.settings";
const MAX_WS_BUFFER = 256 * 1024; // bytes queued in the socket before mic pages are skipped
const INFO_POLL_MS = 3000; // how often an idle page asks whether the server is free

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
  meterInBox: $("meter-in-box"),
  meterOutBox: $("meter-out-box"),
  lag: $("lag"),
  transcript: $("transcript"),
  clear: $("clear"),
  undo: $("undo"),
  save: $("save"),
  saveNote: $("save-note"),
  form: $("settings"),
  conditioning: $("conditioning"),
  persona: $("persona"),
  resetSettings: $("reset-settings"),
};
// Query parameters: the settings form's fields, named as Kyutai's client sends them (the persona card's
// prompt and voice belong to the form too, by their form attribute, named as NVIDIA's client sends them).
// Their limits, kinds and help come from the server's knob table (/api/info), the one its own checks use.
const PARAMS = Array.from(ui.form.elements, (input) => input.name).filter(Boolean);
for (const name of PARAMS) if (ui.form.elements[name].type === "number") ui.form.elements[name].step = "any"; // until the server says which are whole
const knobs = {}; // name -> the server's knob (low, high, open_low, kind, default, help)

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
  userWords: 0, // the user's words the server wrote down (0x08)
  inputRms: 0,
  maxInputRms: 0,
  outputRms: 0,
  maxOutputRms: 0,
  errors: [],
  serverInfo: null,
  serverStats: null,
  serverBusy: false,
  serverDown: false,
  micOptions: MIC_OPTIONS,
  micZeroSeconds: 0, // exact zeros since the microphone opened, while it has given nothing else
  micSilent: false, // it gave only exact zeros for SILENT_MIC_SECONDS: blocked by the system, or muted
  // Live captions (a speech-to-text model, info.text_only): the server's "captions" metadata, one per frame.
  captionFrames: 0,
  words: 0,
  endOfTurn: null, // head 2's probability at the last frame (null: no VAD heads)
  turnEnds: 0,
};
const FRESH = JSON.stringify(stats); // every connect starts from these counters
// settingsQuery: the query the next connection sends (tests check what the form turns into).
window.moshi = { stats, recording: null, settingsQuery: () => settingsQuery().toString() };

// ---------------------------------------------------------------------------------------------
// Small UI helpers
// ---------------------------------------------------------------------------------------------

function setState(state, text) {
  stats.state = state;
  ui.body.dataset.state = state;
  if (text !== undefined) ui.status.textContent = text;
  const busy = state === "starting" || state === "connecting" || state === "live";
  ui.connect.textContent = busy ? "Disconnect" : "Connect";
  for (const input of ui.form.elements) input.disabled = busy;
  updateConnectButton();
}

// Connect is disabled, with the reason beside it, while another conversation holds the server.
function updateConnectButton() {
  const live = session !== null;
  const blocked = !live && stats.serverBusy;
  ui.connect.disabled = stats.state === "stopping" || blocked;
  ui.connect.title = blocked ? "Moshi is busy with another conversation" : "";
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
let lastAria = 0;
function drawMeters(now) {
  const inPct = Math.round(meterIn * 100);
  const outPct = Math.round(meterOut * 100);
  ui.meterIn.style.width = `${inPct}%`;
  ui.meterOut.style.width = `${outPct}%`;
  // Screen readers get the same values (role="meter"), a few times a second rather than every frame.
  if (now - lastAria > 250 || (inPct === 0 && outPct === 0)) {
    lastAria = now;
    for (const [box, pct] of [[ui.meterInBox, inPct], [ui.meterOutBox, outPct]]) {
      if (box.getAttribute("aria-valuenow") !== String(pct)) {
        box.setAttribute("aria-valuenow", String(pct));
        box.setAttribute("aria-valuetext", `${pct}%`);
      }
    }
  }
  requestAnimationFrame(drawMeters);
}
requestAnimationFrame(drawMeters);

let currentTurn = null;
let turnEnded = false; // captions: the speaker finished a turn; the next words start a new paragraph
function startTurn(heading = `Conversation at ${new Date().toLocaleTimeString()}`) {
  const placeholder = ui.transcript.querySelector(".placeholder");
  if (placeholder) placeholder.remove();
  const p = document.createElement("p");
  const head = document.createElement("span");
  head.className = "turn-head";
  head.textContent = heading;
  p.append(head, document.createTextNode(""));
  ui.transcript.append(p);
  currentTurn = p.lastChild;
  speaking = "moshi";
}
// Who the open line belongs to once the user's words come too: a change of speaker starts a labelled line.
let speaking = "moshi";
function speakerLine(who, seconds) {
  const p = document.createElement("p");
  p.className = `speaker-${who}`;
  const head = document.createElement("span");
  head.className = "turn-head";
  head.textContent = `[${seconds.toFixed(1)} s] ${who}: `;
  p.append(head, document.createTextNode(""));
  ui.transcript.append(p);
  speaking = who;
  return p.lastChild;
}
function addUserWords(words) {
  if (!currentTurn) startTurn();
  if (!words.length) return;
  if (speaking !== "you") currentTurn = speakerLine("you", words[0].start);
  for (const w of words) currentTurn.data += (currentTurn.data ? " " : "") + w.text;
  stats.userWords += words.length;
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}
function addText(piece) {
  if (turnEnded && piece.trim()) {
    turnEnded = false;
    startTurn(`Next turn, from ${session ? session.elapsed().toFixed(1) : "?"} s`);
  }
  if (!currentTurn) startTurn();
  if (speaking === "you") currentTurn = speakerLine("moshi", session ? session.elapsed() : 0);
  if (session && session.recording) session.recording.addText(piece, session.elapsed());
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
function savedSetting(name) {
  try {
    return JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}")[name] || "";
  } catch (e) {
    return "";
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
    if (value === "" || input.closest("[hidden]")) continue; // blank, or not for this model (guidance)
    if (!input.checkValidity()) {
      throw new UserError(`Setting "${input.parentElement.firstChild.textContent.trim()}" is not valid: ${input.validationMessage}`);
    }
    params.set(name, value);
  }
  return params;
}
// The form offers only the server's knobs: a speech-to-text model reads its captions greedily, so its table
// leaves out the temperatures, top-k/p, min-p and seeds (queryParams skips hidden fields).
function applyKnobs(table) {
  const offered = new Set((table || []).map((knob) => knob.name));
  for (const name of PARAMS) {
    const input = ui.form.elements[name];
    // Guidance and the persona's role and voice are not knobs: applyConditioning / applyPersona show them.
    if (ui.conditioning.contains(input) || ui.persona.contains(input)) continue;
    input.closest("label").hidden = table !== undefined && !offered.has(name);
  }
  for (const knob of table || []) {
    const input = ui.form.elements[knob.name];
    if (!input || input.type !== "number") continue; // a knob this form does not offer as a number (seed, condition)
    knobs[knob.name] = knob;
    input.min = String(knob.low);
    input.max = String(knob.high);
    input.step = knob.kind === "float" ? "any" : "1";
    input.title = knob.help;
    checkOpenLow(input);
  }
}
// An open lower bound (repetition_penalty > 0) has no HTML attribute: checked here, in the server's words.
function checkOpenLow(input) {
  const knob = knobs[input.name];
  const bad = knob && knob.open_low && input.value.trim() !== "" && Number(input.value) <= knob.low;
  input.setCustomValidity(bad ? `must be > ${knob.low} and <= ${knob.high}` : "");
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
    this.recording = null;
  }

  // Seconds since the conversation started, on the audio clock.
  elapsed() {
    if (!this.ctx || !this.recording) return 0;
    return this.ctx.currentTime - this.recording.startFrame / this.recording.sampleRate;
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
    const wsUrl = this.wsUrl(); // bad settings are reported before anything starts

    // Create and resume the context while still inside the click (Safari insists).
    this.ctx = new AudioCtx({ latencyHint: "interactive" });
    const resumed = this.ctx.resume();

    // Is the server there and free? (Otherwise the first failure would be an obscure worklet error.)
    setState("starting", "Contacting the server…");
    const info = await fetchInfo();
    if (!info) throw new UserError(serverDownText());
    if (info.busy) {
      this.busy = true;
      throw new UserError(BUSY_TEXT);
    }
    if (this.closed) return;

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
    try {
      await this.ctx.audioWorklet.addModule("audio-worklets.js");
    } catch (e) {
      throw new UserError(`${serverDownText()} (the page's audio code could not be loaded)`);
    }
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
    this.playback.port.onmessage = (e) => this.onPlayback(e.data);
    this.playback.connect(this.ctx.destination);

    setState("connecting", "Connecting to Moshi…");
    this.openSocket(wsUrl);
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
    params.set("user_words", "1"); // a server with --transcribe-user then sends the user's words (0x08)
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const qs = params.toString();
    return `${scheme}//${location.host}/api/chat${qs ? "?" + qs : ""}`;
  }

  openSocket(url) {
    const ws = new WebSocket(url);
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
          // The recording starts now, on the audio clock shared by the mic and playback worklets.
          const rate = this.ctx.sampleRate;
          const textOnly = Boolean(document.body.dataset.textOnly); // captions: the microphone and the words
          const startFrame = Math.round(this.ctx.currentTime * rate);
          this.recording = new ConversationRecording(rate, startFrame, new Date(), textOnly);
          this.journal = new RecordingJournal(this.recording); // kept in IndexedDB as it goes: survives a crash
          window.moshi.recording = this.recording;
          renderSave();
          startTurn();
          setState("live", document.body.dataset.textOnly ? "Connected: captioning your microphone" : "Connected: talk to Moshi");
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
      case KIND.USER_WORDS:
        try {
          addUserWords(JSON.parse(new TextDecoder().decode(payload)).words || []);
        } catch (e) {
          /* not JSON: ignore */
        }
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
      showModel(meta);
      const ignored = Object.keys(meta.ignored_params || {});
      if (ignored.length) console.info("server ignored parameters:", meta.ignored_params);
    } else if (meta.type === "stats") {
      stats.serverStats = meta;
      this.renderLag();
    } else if (meta.type === "captions") {
      showCaptionFrame(meta);
      if (this.recording) for (const word of meta.words || []) this.recording.addWord(word);
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
    if (!document.body.dataset.textOnly) parts.push(`playback buffer ${Math.round(stats.bufferedMs)} ms`);
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
    if (data.type !== "audio" || this.closed) return;
    this.checkSilentMic(data);
    stats.inputRms = data.rms;
    stats.maxInputRms = Math.max(stats.maxInputRms, data.rms);
    meterIn = level(data.rms);
    if (!this.streaming || !this.encoder) return;
    if (this.recording) this.recording.addMic(data.samples, data.frame); // copied before the transfer
    stats.micChunks++;
    this.encoder.postMessage({ command: "encode", buffers: [data.samples] }, [data.samples.buffer]);
  }

  // A microphone the system blocks gives exact zeros, with no error (macOS: the browser not allowed in
  // System Settings); a real one never does (its noise floor). Said once, as the terminal app says it.
  checkSilentMic(data) {
    if (stats.micSilent || stats.micZeroSeconds < 0) return;
    if (data.rms > 0) {
      stats.micZeroSeconds = -1; // heard something: the check is over
      return;
    }
    stats.micZeroSeconds += data.samples.length / this.ctx.sampleRate;
    if (stats.micZeroSeconds >= SILENT_MIC_SECONDS) {
      stats.micSilent = true;
      showMessage(SILENT_MIC_TEXT, "info");
    }
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

  onPlayback(s) {
    if (this.closed) return;
    if (s.type === "played") {
      if (this.recording) this.recording.addMoshi(s.samples, s.frame);
      return;
    }
    if (s.type !== "stats") return;
    stats.outputRms = s.rms;
    stats.maxOutputRms = Math.max(stats.maxOutputRms, s.rms);
    stats.samplesPlayed = s.played;
    stats.underruns = s.underruns;
    stats.bufferedMs = s.bufferedMs;
    meterOut = level(s.rms);
    if (stats.state === "live") {
      this.renderLag();
      renderSave();
    }
  }

  onClose(e) {
    if (this.userStopped || (this.closed && session !== this)) return;
    const wasLive = stats.handshake;
    let message = null;
    if (this.busy) {
      message = BUSY_TEXT;
      stats.serverBusy = true;
    } else if (this.serverError) {
      // before the handshake: the server refused this connection's settings (a bad voice, a too long prompt)
      message = wasLive ? `The server ended the conversation: ${this.serverError}` : `The server refused: ${this.serverError}`;
    } else if (!wasLive) {
      message = serverDownText();
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
    if (this.recording && this.ctx) this.recording.stop(this.ctx.currentTime * this.ctx.sampleRate);
    if (this.journal) this.journal.stop();
    ui.lag.textContent = ""; // the last conversation's figures would be stale
    ui.lag.classList.remove("behind");
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
    renderSave();
    schedulePoll(500);
  }
}

class UserError extends Error {}

const SILENT_MIC_SECONDS = 3;
const SYSTEM_MIC_SETTINGS =
  "on a Mac, System Settings → Privacy & Security → Microphone must allow the browser; on Windows, " +
  "Settings → Privacy & security → Microphone";
const SILENT_MIC_TEXT =
  `Your microphone gives only silence (exact zeros for ${SILENT_MIC_SECONDS} s): the system may be blocking it ` +
  `(${SYSTEM_MIC_SETTINGS}), or it is muted. Fix that, then disconnect and connect again.`;

const BUSY_TEXT = "Moshi is busy with another conversation (another tab or person). Connect becomes available when it ends.";
function serverDownText() {
  return `The Moshi server at ${location.host} does not answer. Is it still running? (python -m moshi_mlx.local_web)`;
}

async function fetchInfo() {
  try {
    const r = await fetch("api/info", { cache: "no-store" });
    return r.ok ? await r.json() : null;
  } catch (e) {
    return null;
  }
}

function micError(e) {
  const name = e && e.name;
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return new UserError(
      "Microphone access was denied. Allow it for this page (the icon in the address bar, or the browser's site " +
        `settings) and for the browser itself (${SYSTEM_MIC_SETTINGS}), then connect again.`,
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
  // Fresh state: counters, meters and the lag line from a previous conversation are gone.
  const keep = { serverBusy: stats.serverBusy, serverDown: stats.serverDown, serverInfo: stats.serverInfo };
  Object.assign(stats, JSON.parse(FRESH), keep, { connects: stats.connects });
  meterIn = meterOut = 0;
  ui.lag.textContent = "";
  ui.lag.classList.remove("behind");
  const s = new Session();
  session = s;
  try {
    await s.start();
  } catch (e) {
    if (s.userStopped) return; // the user pressed Disconnect while we were starting
    if (!(e instanceof UserError)) console.error(e);
    s.teardown();
    setState("error", "Not connected");
    showMessage(e instanceof UserError ? e.message : `Could not start: ${(e && e.message) || e}`);
  }
}

ui.connect.addEventListener("click", () => {
  if (session) session.stop();
  else connect();
});
// Clear can be undone for a while (the recording keeps everything anyway).
let cleared = null;
let undoTimer = 0;
ui.clear.addEventListener("click", () => {
  const removed = document.createDocumentFragment();
  while (ui.transcript.firstChild) removed.append(ui.transcript.firstChild);
  cleared = { removed, turn: currentTurn };
  currentTurn = null;
  if (session && stats.handshake) startTurn();
  ui.undo.hidden = false;
  ui.undo.focus();
  clearTimeout(undoTimer);
  undoTimer = setTimeout(() => {
    ui.undo.hidden = true;
    cleared = null;
  }, 15000);
});
ui.undo.addEventListener("click", () => {
  if (!cleared) return;
  const live = ui.transcript.firstChild;
  const onlyNewHead = live && live === ui.transcript.lastChild && live.lastChild && live.lastChild.data === "";
  if (onlyNewHead) live.remove(); // nothing said since the clear: carry on in the restored turn
  ui.transcript.prepend(cleared.removed);
  if (onlyNewHead || !live) currentTurn = cleared.turn;
  cleared = null;
  ui.undo.hidden = true;
  clearTimeout(undoTimer);
});

// ---------------------------------------------------------------------------------------------
// Saving the conversation (all in the page: the files are made here and never uploaded)
// ---------------------------------------------------------------------------------------------

function renderSave() {
  const rec = window.moshi.recording;
  const has = Boolean(rec && !rec.empty);
  ui.save.hidden = !has;
  if (!has) return;
  // A speech-to-text model's recording has no Moshi channel: the microphone alone (mono) and the timed words.
  for (const button of ui.save.querySelectorAll("[data-save=stereo], [data-save=mixed]")) button.hidden = rec.textOnly;
  ui.save.querySelector("[data-save=mic]").hidden = !rec.textOnly;
  $("save-channels").textContent = rec.textOnly
    ? "Audio: your microphone as sent for captioning; transcript: each word with its start and end in seconds."
    : "Stereo: you on the left, Moshi on the right, as heard here.";
  const secs = rec.seconds.toFixed(1);
  ui.saveNote.textContent = rec.recovered
    ? `Not saved last time: ${secs} s recorded ${rec.startedAt.toLocaleString()}, kept by this browser ` +
      `(the page was closed, reloaded or crashed). Save it now; nothing is uploaded.`
    : rec.endFrame === null
      ? `Recording: ${secs} s so far.`
      : `Recorded ${secs} s. Kept in this page until you connect again; nothing is uploaded.`;
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

ui.save.addEventListener("click", (e) => {
  const kind = e.target.closest("button[data-save]")?.dataset.save;
  const rec = window.moshi.recording;
  if (!kind || !rec) return;
  const stem = rec.fileStem();
  const info = stats.serverInfo || {};
  if (kind === "stereo") download(rec.stereoWav(), `${stem}-stereo.wav`);
  else if (kind === "mixed") download(rec.mixedWav(), `${stem}-mixed.wav`);
  else if (kind === "mic") download(rec.micWav(), `${stem}-mic.wav`);
  else if (kind === "txt") download(rec.textBlob(), `${stem}-transcript.txt`);
  else if (kind === "json") download(rec.jsonBlob({ model: info.model, settings: info.settings }), `${stem}-transcript.json`);
  markSaved(rec.storeId); // taken: not offered again after a reload
});

// A conversation a closed or crashed page did not save is offered again (the browser kept it).
async function offerUnsaved() {
  try {
    const rec = await lastUnsaved();
    if (!rec || window.moshi.recording) return;
    window.moshi.recording = rec;
    renderSave();
  } catch (e) {
    console.warn(`could not read the recordings this browser kept: ${e && e.message}`); // the page works without
  }
}

// ---------------------------------------------------------------------------------------------
// Is the server there and free? (asked while no conversation runs here)
// ---------------------------------------------------------------------------------------------

const serverNote = $("server-note");
let pollTimer = 0;
function schedulePoll(ms = INFO_POLL_MS) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollInfo, ms);
}
// The model's name and kind ("translation model" for Hibiki), from /api/info or the 0x04 info message.
function showModel(info) {
  ui.model.textContent = [info.model, info.model_kind].filter(Boolean).join(" · ");
  ui.demoNote.hidden = !info.demo;
  showTextOnly(Boolean(info.text_only));
}
// A speech-to-text model (live captions): it says nothing back, so no "Moshi" meter; the transcript is yours,
// and the end-of-turn meter shows.
function showTextOnly(textOnly) {
  document.body.dataset.textOnly = textOnly ? "1" : "";
  $("meter-out-box").closest(".meter-row").hidden = textOnly;
  $("eot").hidden = !textOnly;
  $("transcript-title").textContent = textOnly ? "Live captions of what you say" : "What Moshi says";
  if (textOnly) ui.demoNote.textContent = "Demo mode: the model has random weights, so the captions are made-up words.";
  const placeholder = ui.transcript.querySelector(".placeholder");
  if (placeholder) placeholder.textContent = textOnly
    ? "Connect and start talking; your words appear here as captions."
    : "Connect and start talking; Moshi's words appear here.";
}
// One "captions" metadata message (one frame of a speech-to-text model): the end-of-turn meter, words, turn ends.
function showCaptionFrame(meta) {
  stats.captionFrames++;
  stats.words += (meta.words || []).length;
  if (typeof meta.end_of_turn === "number") {
    stats.endOfTurn = meta.end_of_turn;
    const pct = Math.round(meta.end_of_turn * 100);
    $("eot-bar").style.width = `${pct}%`;
    $("eot-box").setAttribute("aria-valuenow", String(pct));
    $("eot-box").setAttribute("aria-valuetext", `${pct}%`);
    $("eot-value").textContent = meta.end_of_turn.toFixed(2);
    $("eot").classList.toggle("finished", meta.end_of_turn > 0.5);
  }
  if (meta.turn_end) {
    stats.turnEnds++;
    turnEnded = true;
  }
}
// Guidance and condition exist only for a model with conditioners: the fieldset shows only then.
function applyConditioning(conditioning) {
  ui.conditioning.hidden = !conditioning;
  if (!conditioning) return;
  const select = ui.form.elements.condition;
  const chosen = select.value || savedSetting("condition");
  const options = [new Option(`model default (${conditioning.default})`, "")];
  for (const value of conditioning.values) options.push(new Option(value, value));
  select.replaceChildren(...options);
  select.value = conditioning.values.includes(chosen) ? chosen : "";
}
// Role prompt and voice exist only for a persona model: the card shows only then, its voices the server's.
function applyPersona(persona) {
  ui.persona.hidden = !persona;
  if (!persona) return;
  const select = ui.form.elements.voice_prompt;
  const chosen = select.value || savedSetting("voice_prompt");
  const label = persona.voice ? `server default (${persona.voice})` : "server default";
  const options = [new Option(label, "")];
  for (const voice of persona.voices) options.push(new Option(voice, voice));
  select.replaceChildren(...options);
  select.value = persona.voices.includes(chosen) ? chosen : "";
  if (persona.text_prompt) ui.form.elements.text_prompt.placeholder = persona.text_prompt;
}
async function pollInfo() {
  if (session) return; // our own conversation: the server is ours
  const info = await fetchInfo();
  if (session) return;
  stats.serverDown = !info;
  stats.serverBusy = Boolean(info && info.busy);
  if (info) showModel(info);
  serverNote.hidden = !(stats.serverDown || stats.serverBusy);
  serverNote.textContent = stats.serverDown ? serverDownText() : stats.serverBusy ? BUSY_TEXT : "";
  updateConnectButton();
  schedulePoll();
  return info;
}
ui.form.addEventListener("input", (e) => {
  if (e.target.name) checkOpenLow(e.target);
  saveSettings();
});
ui.form.addEventListener("submit", (e) => e.preventDefault());
ui.resetSettings.addEventListener("click", () => {
  for (const name of PARAMS) {
    ui.form.elements[name].value = "";
    checkOpenLow(ui.form.elements[name]);
  }
  saveSettings();
});

async function init() {
  loadSettings();
  setState("idle", "Not connected");
  offerUnsaved();
  const info = await pollInfo();
  if (info) {
    applyKnobs(info.knobs);
    applyConditioning(info.conditioning);
    applyPersona(info.persona);
    showDefaults(info.defaults);
  }
  if (flag("autoconnect", false) && !ui.connect.disabled) connect();
}

init();
