// talkgate.js — a small browser client for the talkgate gateway (no build step).
//
//   import { connect } from "/static/talkgate.js";
//   const tg = connect("/ws", { token });            // or { join: {room, identity, role, name} } on a --dev server
//   tg.on("joined", (m) => ...); tg.on("chat", (m) => ...); tg.on("error", (m) => ...);
//   tg.chat("hello"); tg.escalate(); tg.accept("r1"); tg.leave();
//   await tg.startVoice(); await tg.startVideo(); tg.upgrade("video"); tg.replyUpgrade(id, true);
//   tg.mute("audio", true); tg.hangUp(); tg.on("track", ({ track, kind }) => ...);
//
// Every server message is emitted as an event named after its "type" (the
// message is the listener's argument). "status" events report the connection:
// "connecting", "open", "reconnecting", "closed". After a dropped connection the
// client reconnects with backoff and joins again; the gateway treats that as a
// reload (same identity replaces the old session) and sends the history again.
//
// Media: the gateway terminates WebRTC, so the client has one RTCPeerConnection
// with the gateway whatever the number of participants. Negotiation follows the
// perfect-negotiation pattern with the browser as the *polite* side: when the
// gateway's offer collides with ours, ours is rolled back, theirs answered, and
// the browser offers again by itself.

const KEEPALIVE_MS = 25000;
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
// Close codes after which reconnecting cannot help (see docs/protocol.md).
const FINAL_CLOSE_CODES = new Set([1000, 4401, 4403, 4409]);

export class TalkgateClient {
  constructor(url, { token = null, join = null } = {}) {
    this.url = resolveWsUrl(url);
    this.token = token;
    this.joinFields = join;
    this.status = "connecting";
    this.joined = null; // the last "joined" message
    this._listeners = new Map();
    this._attempt = 0;
    this._closedByUser = false;
    this.pc = null;
    this.local = { audio: null, video: null }; // our MediaStreamTracks
    this.muted = { audio: false, video: false };
    this.remoteTracks = new Set();
    this._makingOffer = false;
    this.on("offer", (m) => this._onOffer(m.sdp));
    this.on("answer", (m) => this._onAnswer(m.sdp));
    this._open();
  }

  // -- media ----------------------------------------------------------------

  _resumeMedia() {
    const resume = this._rejoinMedia;
    this._rejoinMedia = null;
    if (!resume) return;
    const pc = this._ensurePc();
    for (const track of [resume.audio, resume.video]) {
      if (track && track.readyState === "live") pc.addTrack(track);
    }
  }

  get inCall() { return Boolean(this.local.audio || this.local.video || this.pc); }

  async startVoice() { return this._startLocal("audio", { audio: { echoCancellation: true, noiseSuppression: true } }); }
  async startVideo() { return this._startLocal("video", { video: { width: { ideal: 640 }, height: { ideal: 480 } } }); }

  upgrade(media) { this.send({ type: "upgrade", media }); }
  replyUpgrade(id, accept) { this.send({ type: "upgrade.reply", id, accept }); }

  mute(kind, muted) {
    this.muted[kind] = muted;
    if (this.local[kind]) this.local[kind].enabled = !muted;
    this._emit("mute", { kind, muted });
  }

  stopVideo() {
    const track = this.local.video;
    if (!track) return;
    track.stop();
    this.local.video = null;
    const sender = this.pc && this.pc.getSenders().find((s) => s.track === track);
    if (sender) sender.replaceTrack(null);
    this._emit("localtrack", { kind: "video", track: null });
  }

  hangUp() {
    for (const kind of ["audio", "video"]) {
      if (this.local[kind]) this.local[kind].stop();
      this.local[kind] = null;
    }
    if (this.pc) {
      this.pc.close();
      this.pc = null;
      this.send({ type: "hangup" });
    }
    this.remoteTracks.clear();
    this._emit("call", { state: "idle" });
  }

  async _startLocal(kind, constraints) {
    if (this.local[kind]) return this.local[kind];
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
    const track = stream.getTracks()[0];
    track.enabled = !this.muted[kind];
    this.local[kind] = track;
    const pc = this._ensurePc();
    // Reuse a transceiver the gateway already offered for this kind, if any.
    const free = pc.getTransceivers().find((t) => t.receiver.track.kind === kind && !t.sender.track && !t.stopped);
    if (free) {
      await free.sender.replaceTrack(track);
      free.direction = "sendrecv";
    } else {
      pc.addTrack(track, stream);
    }
    this._emit("localtrack", { kind, track });
    return track;
  }

  _ensurePc() {
    if (this.pc) return this.pc;
    const iceServers = (this.joined && this.joined.ice_servers) || [];
    const pc = new RTCPeerConnection({ iceServers, bundlePolicy: "max-bundle" });
    this.pc = pc;
    // performance.now() of creation, first offer sent and "connected", for measurements.
    this.callTimings = { created: performance.now(), offerSent: null, connected: null };
    this._emit("call", { state: "connecting" });
    pc.onnegotiationneeded = () => this._offer(pc);
    pc.ontrack = (event) => {
      this.remoteTracks.add(event.track);
      event.track.addEventListener("ended", () => this.remoteTracks.delete(event.track));
      this._emit("track", { track: event.track, kind: event.track.kind, streams: event.streams });
    };
    pc.onconnectionstatechange = () => {
      if (this.pc !== pc) return;
      const state = pc.connectionState;
      if (state === "connected") {
        this.callTimings.connected = this.callTimings.connected || performance.now();
        this._emit("call", { state: "connected" });
      }
      if (state === "failed") this._emit("call", { state: "failed" });
    };
    return pc;
  }

  async _offer(pc) {
    try {
      this._makingOffer = true;
      await pc.setLocalDescription();
      await iceGatheringDone(pc);
      if (this.pc === pc && pc.signalingState === "have-local-offer") {
        this.send({ type: "offer", sdp: pc.localDescription.sdp });
        this.callTimings.offerSent = this.callTimings.offerSent || performance.now();
      }
    } catch (err) {
      console.error("talkgate: offer failed", err);
    } finally {
      this._makingOffer = false;
    }
  }

  async _onOffer(sdp) {
    // Polite peer: a colliding offer of ours is rolled back by setRemoteDescription.
    const pc = this._ensurePc();
    try {
      await pc.setRemoteDescription({ type: "offer", sdp });
      await pc.setLocalDescription();
      await iceGatheringDone(pc);
      this.send({ type: "answer", sdp: pc.localDescription.sdp });
    } catch (err) {
      console.error("talkgate: cannot answer the gateway's offer", err);
    }
  }

  async _onAnswer(sdp) {
    if (!this.pc || this.pc.signalingState !== "have-local-offer") return; // a stale answer
    try {
      await this.pc.setRemoteDescription({ type: "answer", sdp });
    } catch (err) {
      console.error("talkgate: cannot apply the gateway's answer", err);
    }
  }

  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this._listeners.get(type).delete(listener);
  }

  chat(text) { this.send({ type: "chat", text }); }
  escalate(reason) { this.send(reason ? { type: "escalate", reason } : { type: "escalate" }); }
  accept(conversation) { this.send({ type: "accept", conversation }); }
  leave() { this.send({ type: "leave" }); }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  close() {
    this._closedByUser = true;
    clearTimeout(this._retryTimer);
    if (this.ws) this.ws.close(1000, "bye");
    this._setStatus("closed");
  }

  _emit(type, message) {
    for (const listener of this._listeners.get(type) || []) {
      try { listener(message); } catch (err) { console.error("talkgate listener failed", err); }
    }
  }

  _setStatus(status, detail = {}) {
    this.status = status;
    this._emit("status", { status, ...detail });
  }

  _open() {
    this._setStatus(this._attempt ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      const join = this.token ? { type: "join", token: this.token } : { type: "join", ...this.joinFields };
      ws.send(JSON.stringify(join));
      this._keepalive = setInterval(() => this.send({ type: "ping" }), KEEPALIVE_MS);
    };
    ws.onmessage = (event) => {
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      if (message.type === "shutdown") {
        // The gateway is draining: when it closes us, come back after its hint (plus
        // jitter, so that every client of a restarted gateway does not return at once).
        this._retryAfterMs = message.retry_after_ms;
      }
      if (message.type === "joined") {
        this._attempt = 0;
        this.joined = message;
        this._setStatus("open");
        this._resumeMedia();
      }
      this._emit(message.type, message);
    };
    ws.onclose = (event) => {
      clearInterval(this._keepalive);
      if (this.ws !== ws) return;
      if (this._closedByUser || FINAL_CLOSE_CODES.has(event.code)) {
        this.hangUp();
        this._setStatus("closed", { code: event.code, reason: event.reason });
        return;
      }
      // The gateway closed our peer connection with the session: renegotiate after rejoining.
      if (this.pc) {
        this.pc.close();
        this.pc = null;
        this._rejoinMedia = { ...this.local };
      }
      let delay = BACKOFF_MS[Math.min(this._attempt, BACKOFF_MS.length - 1)];
      if (this._retryAfterMs != null) {
        delay = this._retryAfterMs * (1 + Math.random() / 2);
        this._retryAfterMs = null;
      }
      this._attempt += 1;
      this._setStatus("reconnecting", { code: event.code, inMs: delay });
      this._retryTimer = setTimeout(() => this._open(), delay);
    };
  }
}

// The gateway does not trickle and the client sends complete descriptions: wait
// for ICE gathering (bounded, so a slow STUN server cannot stall a call).
function iceGatheringDone(pc, timeoutMs = 2000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => { pc.removeEventListener("icegatheringstatechange", done); resolve(); }, timeoutMs);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

export function connect(url, options) {
  return new TalkgateClient(url, options);
}

export function resolveWsUrl(url) {
  const absolute = new URL(url, window.location.href);
  if (absolute.protocol === "http:") absolute.protocol = "ws:";
  if (absolute.protocol === "https:") absolute.protocol = "wss:";
  return absolute.toString();
}

// Shared page helpers -------------------------------------------------------

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child != null) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function formatTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

export function initials(name) {
  return (name || "?").split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0].toUpperCase()).join("");
}

// Renders one chat message (or a system line) into a message list; `mine` is
// the identity of whoever is looking at the page.
export function renderMessage(list, message, mine) {
  const from = message.from || {};
  let node;
  if (from.role === "system") {
    node = el("div", { class: "msg system", dataset: { id: message.id || "" } }, message.text);
  } else {
    const own = from.identity === mine;
    node = el("div", { class: `msg ${own ? "own" : "other"} role-${from.role}`, dataset: { id: message.id || "" } },
      own ? null : el("div", { class: "msg-author" }, from.name || from.identity),
      el("div", { class: "msg-bubble" }, message.text),
      el("div", { class: "msg-meta" }, formatTime(message.ts)));
  }
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.append(node);
  if (nearBottom || (from.identity === mine)) list.scrollTop = list.scrollHeight;
  return node;
}

export function renderNotice(list, text) {
  list.append(el("div", { class: "msg system" }, text));
  list.scrollTop = list.scrollHeight;
}

// The bundled pages' shared chrome: a status line, a banner that can dismiss
// itself (a newer banner cancels the older one's timer), and a chat composer.
export function pageChrome({ status, banner, composer, input }) {
  let timer = null;
  const chrome = {
    status(text, state) {
      status.textContent = text;
      status.dataset.status = state;
    },
    connection({ status: state, inMs }) {
      if (state === "reconnecting") chrome.status(`Reconnecting${inMs ? ` in ${Math.ceil(inMs / 1000)}s` : ""}…`, "reconnecting");
    },
    banner(text, kind = "error", dismissAfterMs = 0) {
      clearTimeout(timer);
      banner.textContent = text;
      banner.className = `banner ${kind}`;
      banner.hidden = !text;
      if (text && dismissAfterMs) timer = setTimeout(() => chrome.banner(""), dismissAfterMs);
    },
    // Sends the input's text as chat through `getClient()` on submit; keeps the text if offline.
    bindComposer(getClient) {
      composer.addEventListener("submit", (event) => {
        event.preventDefault();
        const text = input.value.trim();
        if (text && getClient()?.send({ type: "chat", text })) input.value = "";
      });
    },
  };
  return chrome;
}

export function randomId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
