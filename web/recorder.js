// One conversation, recorded in the page: both voices as they were heard and Moshi's timed words.
//
// The microphone (after the browser's echo cancellation) and Moshi's voice (as the playback worklet
// played it, silence included) arrive as chunks stamped with the AudioContext's frame counter, so the
// two channels line up sample for sample. Audio is kept as 16-bit samples at the context's rate
// (about 11 MB a minute at 48 kHz) and turned into files only when asked for. Nothing leaves the page.
//
// With a speech-to-text model (textOnly: live captions) nothing is played: the recording is the microphone
// alone (micWav, mono) and the timed words of the captions messages (seconds of the audio the server heard),
// as `local --record` keeps them; no Moshi channel.

// One word line of a timed transcript: start and end in seconds, then the word (as `local` prints them).
export function wordLine(w) {
  return `${w.start.toFixed(2).padStart(8)} ${w.end.toFixed(2).padStart(8)}  ${w.text}`;
}

export class ConversationRecording {
  constructor(sampleRate, startFrame, startedAt = new Date(), textOnly = false) {
    this.sampleRate = sampleRate;
    this.textOnly = textOnly;
    this.words = []; // [{text, start, end}]: a speech-to-text model's timed words
    this.startFrame = startFrame;
    this.endFrame = null; // set by stop(); until then the recording grows
    this.startedAt = startedAt;
    this.mic = []; // [{offset, samples: Int16Array}]
    this.moshi = [];
    this.pieces = []; // [{t, text}]
    this.latestFrame = startFrame;
  }

  _add(list, samples, frame) {
    if (this.endFrame !== null) return;
    let offset = frame - this.startFrame;
    let start = 0;
    if (offset < 0) {
      start = -offset; // recorded before the conversation started
      offset = 0;
    }
    if (start >= samples.length) return;
    const pcm = new Int16Array(samples.length - start);
    for (let i = 0; i < pcm.length; i++) {
      const v = Math.max(-1, Math.min(1, samples[start + i]));
      pcm[i] = Math.round(v * 32767);
    }
    list.push({ offset, samples: pcm });
    this.latestFrame = Math.max(this.latestFrame, this.startFrame + offset + pcm.length);
  }

  addMic(samples, frame) {
    this._add(this.mic, samples, frame);
  }

  addMoshi(samples, frame) {
    if (!this.textOnly) this._add(this.moshi, samples, frame); // captions: only the playback's silence
  }

  addWord(word) {
    if (this.endFrame !== null || !word || !word.text) return;
    this.words.push({ text: word.text, start: word.start, end: word.end });
  }

  addText(text, seconds) {
    if (text && this.endFrame === null) this.pieces.push({ t: Math.round(Math.max(0, seconds) * 1000) / 1000, text });
  }

  stop(endFrame) {
    if (this.endFrame === null) this.endFrame = Math.max(this.startFrame, Math.round(endFrame));
  }

  get length() {
    return (this.endFrame ?? this.latestFrame) - this.startFrame;
  }

  get seconds() {
    return this.length / this.sampleRate;
  }

  get empty() {
    return this.length <= 0 && this.pieces.length === 0 && this.words.length === 0;
  }

  text() {
    if (this.textOnly) return this.words.map((w) => w.text).join(" ");
    return this.pieces.map((p) => p.text).join("").trim();
  }

  _channel(list, n) {
    const out = new Int16Array(n);
    for (const { offset, samples } of list) {
      if (offset >= n) continue;
      out.set(offset + samples.length > n ? samples.subarray(0, n - offset) : samples, offset);
    }
    return out;
  }

  stereoWav() {
    const n = this.length;
    const left = this._channel(this.mic, n);
    const right = this._channel(this.moshi, n);
    const pcm = new Int16Array(2 * n);
    for (let i = 0; i < n; i++) {
      pcm[2 * i] = left[i];
      pcm[2 * i + 1] = right[i];
    }
    return wavBlob(pcm, 2, this.sampleRate);
  }

  micWav() {
    return wavBlob(this._channel(this.mic, this.length), 1, this.sampleRate);
  }

  mixedWav() {
    const n = this.length;
    const left = this._channel(this.mic, n);
    const right = this._channel(this.moshi, n);
    const pcm = new Int16Array(n);
    for (let i = 0; i < n; i++) pcm[i] = Math.max(-32767, Math.min(32767, left[i] + right[i]));
    return wavBlob(pcm, 1, this.sampleRate);
  }

  textBlob() {
    const body = this.textOnly ? this.words.map((w) => wordLine(w) + "\n").join("") : this.text() + "\n";
    return new Blob([body], { type: "text/plain;charset=utf-8" });
  }

  jsonBlob(extra = {}) {
    const data = {
      started_at: this.startedAt.toISOString(),
      seconds: Math.round(this.seconds * 1000) / 1000,
      sample_rate: this.sampleRate,
      channels: this.textOnly
        ? { mono: "you (microphone, after the browser's echo cancellation)" }
        : { left: "you (microphone, after the browser's echo cancellation)", right: "Moshi (as played)" },
      text: this.text(),
      ...(this.textOnly ? { words: this.words } : { pieces: this.pieces }),
      ...extra,
    };
    return new Blob([JSON.stringify(data, null, 1) + "\n"], { type: "application/json" });
  }

  fileStem() {
    const d = this.startedAt;
    const two = (x) => String(x).padStart(2, "0");
    return `moshi-${d.getFullYear()}${two(d.getMonth() + 1)}${two(d.getDate())}-${two(d.getHours())}${two(d.getMinutes())}${two(d.getSeconds())}`;
  }
}

// A 16-bit PCM WAV file from interleaved samples.
export function wavBlob(pcm, channels, sampleRate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, s) => {
    for (let i = 0; i < s.length; i++) header.setUint8(at + i, s.charCodeAt(i));
  };
  const bytes = pcm.length * 2;
  text(0, "RIFF");
  header.setUint32(4, 36 + bytes, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, channels, true);
  header.setUint32(24, sampleRate, true);
  header.setUint32(28, sampleRate * channels * 2, true);
  header.setUint16(32, channels * 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, bytes, true);
  // WAV is little-endian; so is every platform these browsers run on.
  return new Blob([header.buffer, pcm.buffer], { type: "audio/wav" });
}
