// The page's recording kept in the browser's own storage (IndexedDB) as the conversation goes, so that a
// reload, a closed or crashed tab loses at most the last half second; the next visit offers the last
// conversation that was not saved. Nothing leaves the browser.
//
// Database "moshi_mlx-recordings": store "recordings" ({id, sampleRate, startFrame, startedAt, endFrame,
// saved, textOnly}) and store "chunks" ({rec, kind: "mic" | "moshi" | "text" | "word", offset + samples, t +
// text, or a caption word's text + start + end}, indexed by rec); a speech-to-text model's recording (textOnly)
// keeps the microphone and its words, no Moshi channel. Every FLUSH_MS what the recording gained is appended
// in one transaction, each voice's new chunks joined into runs. Only the newest KEEP recordings are kept.

import { ConversationRecording } from "./recorder.js";

const DB_NAME = "moshi_mlx-recordings";
const FLUSH_MS = 500;
const KEEP = 3;

const settle = (req) =>
  new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
const committed = (tx) =>
  new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = tx.onabort = () => reject(tx.error || new Error("transaction aborted"));
  });

let dbPromise = null;
function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      if (!window.indexedDB) return reject(new Error("this browser has no IndexedDB"));
      const req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = () => {
        const db = req.result;
        db.createObjectStore("recordings", { keyPath: "id" });
        db.createObjectStore("chunks", { autoIncrement: true }).createIndex("rec", "rec");
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  return dbPromise;
}

// Consecutive chunks of one voice (each starting where the last ended) as one run of samples.
function runs(list, from, to) {
  const out = [];
  let parts = [];
  let start = 0;
  let end = -1;
  const close = () => {
    if (!parts.length) return;
    const samples = new Int16Array(end - start);
    let at = 0;
    for (const p of parts) {
      samples.set(p, at);
      at += p.length;
    }
    out.push({ offset: start, samples });
  };
  for (let i = from; i < to; i++) {
    const { offset, samples } = list[i];
    if (offset !== end) {
      close();
      parts = [];
      start = offset;
    }
    parts.push(samples);
    end = offset + samples.length;
  }
  close();
  return out;
}

async function deleteRecording(db, id) {
  const tx = db.transaction(["recordings", "chunks"], "readwrite");
  tx.objectStore("recordings").delete(id);
  const chunks = tx.objectStore("chunks");
  const keys = await settle(chunks.index("rec").getAllKeys(id));
  for (const key of keys) chunks.delete(key);
  await committed(tx);
}

// Writes one ConversationRecording to IndexedDB as it grows; stop() writes the rest and the end.
export class RecordingJournal {
  constructor(recording) {
    this.recording = recording;
    this.id = `${recording.startedAt.getTime()}-${Math.random().toString(36).slice(2, 8)}`;
    recording.storeId = this.id;
    this.written = { mic: 0, moshi: 0, text: 0, word: 0 };
    this.failure = null;
    this.busy = Promise.resolve();
    this.ready = this._begin();
    this.timer = setInterval(() => this.flush(), FLUSH_MS);
  }

  async _begin() {
    const db = await openDb();
    const r = this.recording;
    const tx = db.transaction("recordings", "readwrite");
    tx.objectStore("recordings").put({
      id: this.id, sampleRate: r.sampleRate, startFrame: r.startFrame, startedAt: r.startedAt.toISOString(),
      endFrame: null, saved: false, textOnly: r.textOnly,
    });
    await committed(tx);
    const all = await settle(db.transaction("recordings").objectStore("recordings").getAll());
    all.sort((a, b) => (a.startedAt < b.startedAt ? 1 : -1));
    for (const old of all.slice(KEEP)) await deleteRecording(db, old.id);
  }

  // One flush at a time, in order.
  flush() {
    this.busy = this.busy.then(() => this._flush());
    return this.busy;
  }

  async _flush() {
    if (this.failure) return;
    try {
      await this.ready;
      const r = this.recording;
      const counts = { mic: r.mic.length, moshi: r.moshi.length, text: r.pieces.length, word: r.words.length };
      const rows = [];
      for (const kind of ["mic", "moshi"]) {
        for (const run of runs(r[kind], this.written[kind], counts[kind])) rows.push({ rec: this.id, kind, ...run });
      }
      for (let i = this.written.text; i < counts.text; i++) rows.push({ rec: this.id, kind: "text", ...r.pieces[i] });
      for (let i = this.written.word; i < counts.word; i++) rows.push({ rec: this.id, kind: "word", ...r.words[i] });
      const ended = r.endFrame !== null;
      if (!rows.length && !ended) return;
      const db = await openDb();
      const tx = db.transaction(["chunks", "recordings"], "readwrite");
      const chunks = tx.objectStore("chunks");
      for (const row of rows) chunks.add(row);
      if (ended) {
        const meta = await settle(tx.objectStore("recordings").get(this.id));
        if (meta) tx.objectStore("recordings").put({ ...meta, endFrame: r.endFrame });
      }
      await committed(tx);
      this.written = counts;
    } catch (e) {
      this.failure = e; // the recording still lives in the page; only the copy that survives a crash stopped
      console.warn(`the recording is no longer kept in the browser's storage: ${e && e.message}`);
      clearInterval(this.timer);
    }
  }

  async stop() {
    clearInterval(this.timer);
    await this.flush();
  }
}

// The user took the recording's files: it is no longer offered after a reload.
export async function markSaved(id) {
  if (!id) return;
  try {
    const db = await openDb();
    const tx = db.transaction("recordings", "readwrite");
    const store = tx.objectStore("recordings");
    const meta = await settle(store.get(id));
    if (meta) store.put({ ...meta, saved: true });
    await committed(tx);
  } catch (e) {
    console.warn(`could not mark the recording as saved: ${e && e.message}`);
  }
}

// The newest recording that was not saved and holds something, rebuilt (null if none, or no storage).
export async function lastUnsaved() {
  let db;
  try {
    db = await openDb();
  } catch (e) {
    return null;
  }
  const all = await settle(db.transaction("recordings").objectStore("recordings").getAll());
  all.sort((a, b) => (a.startedAt < b.startedAt ? 1 : -1));
  for (const meta of all) {
    if (meta.saved) continue;
    const chunks = await settle(db.transaction("chunks").objectStore("chunks").index("rec").getAll(meta.id));
    if (!chunks.length) continue;
    const textOnly = Boolean(meta.textOnly);
    const rec = new ConversationRecording(meta.sampleRate, meta.startFrame, new Date(meta.startedAt), textOnly);
    for (const c of chunks) {
      if (c.kind === "text") rec.pieces.push({ t: c.t, text: c.text });
      else if (c.kind === "word") rec.words.push({ text: c.text, start: c.start, end: c.end });
      else {
        rec[c.kind].push({ offset: c.offset, samples: c.samples });
        rec.latestFrame = Math.max(rec.latestFrame, meta.startFrame + c.offset + c.samples.length);
      }
    }
    rec.stop(meta.endFrame ?? rec.latestFrame);
    rec.storeId = meta.id;
    rec.recovered = meta.endFrame === null ? "cut short" : "ended";
    return rec;
  }
  return null;
}
