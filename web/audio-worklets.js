// AudioWorklet processors for the moshi_mlx page.
//
// "moshi-capture": mixes the microphone down to mono and posts ~20 ms chunks (at the context's
//   sample rate) with their RMS level to the page, which feeds them to the Opus encoder.
//   Every chunk carries `frame`, the context's frame counter at its first sample (for recording).
// "moshi-playback": a jitter buffer for Moshi's decoded audio. Chunks arrive (at the decoder's
//   rate, 48 kHz) whenever the network and the model deliver them; playback starts once `startMs`
//   is buffered, pauses (an "underrun") when the buffer runs dry and waits for `startMs` again,
//   each underrun making the target a little longer (up to `maxStartMs`). When more than
//   `maxMs` piles up, the oldest audio is skipped so the delay cannot grow. Output is resampled
//   to the context's rate by linear interpolation. What it outputs (silence included) is posted back
//   every ~100 ms with the frame counter of its first sample, so the page can record Moshi as played.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const ms = (options.processorOptions && options.processorOptions.chunkMs) || 20;
    this.size = Math.max(128, Math.round((sampleRate * ms) / 1000));
    this.buf = new Float32Array(this.size);
    this.n = 0;
    this.sumsq = 0;
    this.frame = 0; // context frame of buf[0]
    this.active = true;
    this.port.onmessage = (e) => {
      if (e.data === "stop") this.active = false;
    };
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      const channels = input.length;
      const len = input[0].length;
      for (let i = 0; i < len; i++) {
        let v = 0;
        for (let c = 0; c < channels; c++) v += input[c][i];
        v /= channels;
        if (this.n === 0) this.frame = currentFrame + i;
        this.buf[this.n++] = v;
        this.sumsq += v * v;
        if (this.n === this.size) {
          const rms = Math.sqrt(this.sumsq / this.size);
          this.port.postMessage({ type: "audio", samples: this.buf, rms, frame: this.frame }, [this.buf.buffer]);
          this.buf = new Float32Array(this.size);
          this.n = 0;
          this.sumsq = 0;
        }
      }
    }
    return this.active;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.startMs = o.startMs || 120;
    this.maxStartMs = o.maxStartMs || 400;
    this.stepMs = o.stepMs || 40;
    this.maxMs = o.maxMs || 1000;
    this.srcRate = o.sourceRate || 48000;
    this.step = this.srcRate / sampleRate;
    this.cap = this.srcRate * 8; // ring buffer of 8 s, far above maxMs
    this.ring = new Float32Array(this.cap);
    this.w = 0; // source samples written (absolute)
    this.r = 0; // read position in source samples (absolute, fractional)
    this.playing = false;
    this.underruns = 0;
    this.skippedMs = 0;
    this.played = 0; // output samples taken from the buffer
    this.received = 0; // source samples received
    this.sumsq = 0;
    this.count = 0;
    this.statsEvery = Math.round(sampleRate / 10);
    this.tap = new Float32Array(this.statsEvery + 256); // output since the last post (recording)
    this.tapLen = 0;
    this.tapFrame = 0;
    this.active = true;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(data) {
    if (data === "stop") {
      this.active = false;
    } else if (data && data.type === "audio") {
      this.push(data.samples, data.sampleRate);
    } else if (data === "reset") {
      this.w = 0;
      this.r = 0;
      this.playing = false;
    }
  }

  bufferedMs() {
    return ((this.w - this.r) * 1000) / this.srcRate;
  }

  push(samples, rate) {
    if (rate && rate !== this.srcRate) {
      // A new rate: start over (never happens within one Opus stream).
      this.srcRate = rate;
      this.step = rate / sampleRate;
      this.cap = rate * 8;
      this.ring = new Float32Array(this.cap);
      this.w = 0;
      this.r = 0;
      this.playing = false;
    }
    for (let i = 0; i < samples.length; i++) this.ring[(this.w + i) % this.cap] = samples[i];
    this.w += samples.length;
    this.received += samples.length;
    const limit = Math.max(this.maxMs, 2 * this.startMs);
    if (this.bufferedMs() > limit) {
      const keep = Math.round((this.startMs * this.srcRate) / 1000);
      const newR = this.w - keep;
      this.skippedMs += ((newR - this.r) * 1000) / this.srcRate;
      this.r = newR;
    }
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const out = output[0];
    if (!this.playing && this.bufferedMs() >= this.startMs) this.playing = true;
    let i = 0;
    if (this.playing) {
      for (; i < out.length; i++) {
        const i0 = Math.floor(this.r);
        if (i0 + 1 >= this.w) {
          // Ran dry: wait for a longer buffer before playing again.
          this.playing = false;
          this.underruns++;
          this.startMs = Math.min(this.maxStartMs, this.startMs + this.stepMs);
          break;
        }
        const f = this.r - i0;
        const v = this.ring[i0 % this.cap] * (1 - f) + this.ring[(i0 + 1) % this.cap] * f;
        out[i] = v;
        this.sumsq += v * v;
        this.r += this.step;
      }
      this.played += i;
    }
    for (let j = i; j < out.length; j++) out[j] = 0;
    for (let c = 1; c < output.length; c++) output[c].set(out);
    if (this.tapLen === 0) this.tapFrame = currentFrame;
    if (this.tapLen + out.length > this.tap.length) this.flushTap();
    this.tap.set(out, this.tapLen);
    this.tapLen += out.length;
    this.count += out.length;
    if (this.count >= this.statsEvery) {
      this.port.postMessage({
        type: "stats",
        rms: Math.sqrt(this.sumsq / this.count),
        bufferedMs: this.bufferedMs(),
        targetMs: this.startMs,
        underruns: this.underruns,
        skippedMs: this.skippedMs,
        played: this.played,
        received: this.received,
        playing: this.playing,
      });
      this.sumsq = 0;
      this.count = 0;
      this.flushTap();
    }
    return this.active;
  }

  flushTap() {
    if (this.tapLen === 0) return;
    const samples = this.tap.slice(0, this.tapLen);
    this.port.postMessage({ type: "played", samples, frame: this.tapFrame }, [samples.buffer]);
    this.tapLen = 0;
    this.tapFrame = currentFrame;
  }
}

registerProcessor("moshi-capture", CaptureProcessor);
registerProcessor("moshi-playback", PlaybackProcessor);
