// talkgate.js — a small browser client for the talkgate gateway (no build step).
//
//   import { connect } from "/static/talkgate.js";
//   const tg = connect("/ws", { token });            // or { join: {room, identity, role, name} } on a --dev server
//   tg.on("joined", (m) => ...); tg.on("chat", (m) => ...); tg.on("error", (m) => ...);
//   tg.chat("hello"); tg.escalate(); tg.accept("r1"); tg.leave();
//   await tg.startVoice(); await tg.startVideo(); tg.upgrade("video"); tg.replyUpgrade(id, true);
//   tg.mute("audio", true); tg.hangUp(); tg.on("track", ({ track, kind, conversation }) => ...);
//
//   // A connection may be in several conversations (an agent with --agent-capacity > 1):
//   tg.conversations;                                 // Map: conversation id -> Conversation
//   const c = tg.conversation("r2");                  // the same methods, for that one
//   c.chat("hi"); await c.startVoice(); c.hangUp(); c.leave(); c.on("chat", (m) => ...);
//   tg.select("r2"); tg.current;                      // the one the short forms above act on
//
//   // A recorded conversation's timeline, a page at a time (newest page first):
//   const page = await tg.history(id, { before: null, limit: 50 }); // page.events, page.more
//
// Every server message is emitted as an event named after its "type" (the
// message is the listener's argument); conversation-scoped ones also go to that
// Conversation's listeners, and carry its id in "conversation". "status" events
// report the connection: "connecting", "open", "reconnecting", "closed". After a
// dropped connection the client reconnects with backoff and joins again; the
// gateway treats that as a reload (same identity replaces the old session) and
// sends the history again.
//
// Media: the gateway terminates WebRTC, so the client has one RTCPeerConnection
// with the gateway per conversation it calls in, whatever the number of
// participants. Negotiation follows the perfect-negotiation pattern with the
// browser as the *polite* side: when the gateway's offer collides with ours, ours
// is rolled back, theirs answered, and the browser offers again by itself.

const KEEPALIVE_MS = 25000;
const HISTORY_TIMEOUT_MS = 10000;
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
// Close codes after which reconnecting cannot help (see docs/protocol.md).
const FINAL_CLOSE_CODES = new Set([1000, 4401, 4403, 4409]);
// Gateway messages that belong to one conversation (they name it in "conversation").
const SCOPED = new Set([
  "joined", "left", "chat", "participant.joined", "participant.left", "queued", "media", "speaking",
  "transcript", "upgrade.request", "upgrade.reply", "offer", "answer", "recording",
]);

// One conversation the connection is in: its "joined" message, who is in it, who sends
// media, and our call in it (peer connection, negotiation state, local tracks). Obtained
// from the client (`tg.conversation(id)`, `tg.current`, `tg.conversations`); it stays
// valid until its "left".
export class Conversation {
  constructor(client, id) {
    this.client = client;
    this.id = id;
    this.joined = null; // the last "joined" message for it
    this.participants = []; // everyone in it, us included
    this.media = new Map(); // identity -> { audio, video }: what the gateway receives from them
    this.recording = false; // the gateway records this conversation's call ("recording" messages)
    this.pc = null; // our RTCPeerConnection for it, while we call
    this.local = { audio: null, video: null }; // our MediaStreamTracks in its call
    this.muted = { audio: false, video: false };
    this.remoteTracks = new Set();
    this.callTimings = null; // performance.now() of creation, first offer sent, "connected"
    this._listeners = new Map();
    this._makingOffer = false;
    this._gatewayHasCall = false; // the gateway has had an offer or answer for this.pc
    this._rejoinMedia = null; // local tracks to send again after a reconnect
  }

  get inCall() { return Boolean(this.local.audio || this.local.video || this.pc); }
  get selected() { return this.client.current === this; }

  // This conversation's events only (server messages and the call's events).
  on(type, listener) { return addListener(this._listeners, type, listener); }

  // Sends a conversation-scoped message naming this conversation.
  send(message) { return this.client.send({ ...message, conversation: this.id }); }
  chat(text) { return this.send({ type: "chat", text }); }
  escalate(reason) { return this.send(reason ? { type: "escalate", reason } : { type: "escalate" }); }
  // Leaving ends our call at the gateway too: end it here without a hangup.
  leave() { this._endCall(false); return this.send({ type: "leave" }); }
  select() { this.client.select(this.id); }

  // -- media ----------------------------------------------------------------

  async startVoice() { return this._startLocal("audio", { audio: { echoCancellation: true, noiseSuppression: true } }); }
  async startVideo() { return this._startLocal("video", { video: { width: { ideal: 640 }, height: { ideal: 480 } } }); }

  upgrade(media) { return this.send({ type: "upgrade", media }); }
  replyUpgrade(id, accept) { return this.send({ type: "upgrade.reply", id, accept }); }

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

  hangUp() { this._endCall(true); }

  _emit(type, payload) { this.client._emit(type, { ...payload, conversation: this.id }, this); }

  // A gateway message for this conversation (before the listeners get it).
  _receive(message) {
    switch (message.type) {
      case "joined":
        this.joined = message;
        this.participants = message.participants;
        this.media = new Map((message.media || []).map((m) => [m.identity, { audio: m.audio, video: m.video }]));
        this.recording = Boolean(message.recording);
        this._resumeMedia();
        break;
      case "recording": this.recording = Boolean(message.active); break;
      case "participant.joined":
        this.participants = this.participants.filter((p) => p.identity !== message.identity)
          .concat([{ identity: message.identity, role: message.role, name: message.name }]);
        break;
      case "participant.left":
        this.participants = this.participants.filter((p) => p.identity !== message.identity);
        this.media.delete(message.identity);
        break;
      case "media":
        if (message.audio || message.video) this.media.set(message.identity, { audio: message.audio, video: message.video });
        else this.media.delete(message.identity);
        break;
      case "offer": this._onOffer(message.sdp); break;
      case "answer": this._onAnswer(message.sdp); break;
      case "left": this._endCall(false); break; // the gateway ended our call with it
    }
  }

  // The connection dropped: the gateway closed our peer connection with the session;
  // send the same tracks again once rejoined.
  _suspend() {
    if (!this.pc) return;
    this.pc.close();
    this.pc = null;
    this._gatewayHasCall = false;
    this._rejoinMedia = { ...this.local };
  }

  _resumeMedia() {
    const resume = this._rejoinMedia;
    this._rejoinMedia = null;
    if (!resume) return;
    const pc = this._ensurePc();
    for (const track of [resume.audio, resume.video]) {
      if (track && track.readyState === "live") pc.addTrack(track);
    }
  }

  // Ends the call here; tells the gateway only when `tell` and the gateway knows of the
  // call (it has had an offer or an answer from us). Leaving, a "left" and a closed
  // connection end the call at the gateway by themselves: no hangup then.
  _endCall(tell) {
    for (const kind of ["audio", "video"]) {
      if (this.local[kind]) this.local[kind].stop();
      this.local[kind] = null;
    }
    this._rejoinMedia = null;
    const wasInCall = Boolean(this.pc);
    if (this.pc) {
      this.pc.close();
      this.pc = null;
      if (tell && this._gatewayHasCall) this.send({ type: "hangup" });
    }
    this._gatewayHasCall = false;
    this.remoteTracks.clear();
    if (wasInCall || tell) this._emit("call", { state: "idle" });
  }

  async _startLocal(kind, constraints) {
    if (this.local[kind]) return this.local[kind];
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
    const track = stream.getTracks()[0];
    if (this.client.conversation(this.id) !== this) { track.stop(); throw new Error("the conversation has ended"); }
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
        if (this.send({ type: "offer", sdp: pc.localDescription.sdp })) this._gatewayHasCall = true;
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
      if (this.pc === pc) this.send({ type: "answer", sdp: pc.localDescription.sdp });
      this._gatewayHasCall = this.pc === pc;
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
}

const NO_TRACKS = Object.freeze({ audio: null, video: null });
const NOT_MUTED = Object.freeze({ audio: false, video: false });

export class TalkgateClient {
  constructor(url, { token = null, join = null } = {}) {
    this.url = resolveWsUrl(url);
    this.token = token;
    this.joinFields = join;
    this.status = "connecting";
    this.me = null; // { identity, role, name }, from "joined"
    this.capacity = null; // conversations this connection may hold, when the gateway says (joined.capacity)
    this.conversations = new Map(); // conversation id -> Conversation, in the order joined
    this._currentId = null;
    this._lastJoined = null;
    this._accepting = null; // the conversation we last accepted: current once joined
    this._joinedSinceOpen = null; // conversations re-joined since the websocket opened
    this._listeners = new Map();
    this._attempt = 0;
    this._closedByUser = false;
    this._historyWaiting = []; // { resolve, reject, timer } per history request, in the order sent
    this._open();
  }

  // -- conversations ----------------------------------------------------------

  conversation(id) { return this.conversations.get(id) || null; }

  // The conversation the short forms (chat, call, hangUp, leave, pc, local…) act on: the
  // only one, the one selected, or else the first one joined. "select" events report changes.
  get current() { return this.conversations.get(this._currentId) || null; }

  select(id) {
    if (!this.conversations.has(id) || id === this._currentId) return;
    this._currentId = id;
    this._emit("select", { conversation: id });
  }

  // The current conversation's "joined" message (the last one, in the lobby).
  get joined() { return this.current ? this.current.joined : this._lastJoined; }
  get pc() { return this.current ? this.current.pc : null; }
  get local() { return this.current ? this.current.local : NO_TRACKS; }
  get muted() { return this.current ? this.current.muted : NOT_MUTED; }
  get remoteTracks() { return this.current ? this.current.remoteTracks : new Set(); }
  get callTimings() { return this.current ? this.current.callTimings : null; }
  get inCall() { return Boolean(this.current && this.current.inCall); }

  _need() {
    if (!this.current) throw new Error("talkgate: not in a conversation");
    return this.current;
  }

  chat(text) { return this.current ? this.current.chat(text) : this.send({ type: "chat", text }); }
  escalate(reason) {
    if (this.current) return this.current.escalate(reason);
    return this.send(reason ? { type: "escalate", reason } : { type: "escalate" });
  }
  accept(conversation) {
    this._accepting = conversation;
    return this.send({ type: "accept", conversation });
  }
  leave() { return this.current ? this.current.leave() : this.send({ type: "leave" }); }
  startVoice() { return this._need().startVoice(); }
  startVideo() { return this._need().startVideo(); }
  stopVideo() { if (this.current) this.current.stopVideo(); }
  upgrade(media) { return this._need().upgrade(media); }
  replyUpgrade(id, accept) { return this._need().replyUpgrade(id, accept); }
  mute(kind, muted) { if (this.current) this.current.mute(kind, muted); }
  hangUp() { if (this.current) this.current.hangUp(); }

  // A page of a recorded conversation's timeline (a record id, as in a customer card's
  // "previous", or a room id): resolves to the "history" message ({events, more, record,
  // ...}; events oldest first; `before` = the first event's id gets the page before it);
  // rejects with an Error whose `code` is the gateway's (forbidden, not_found, unavailable).
  history(conversation, { before = null, limit = 50 } = {}) {
    return new Promise((resolve, reject) => {
      if (!this.send({ type: "history", conversation, before, limit })) {
        reject(Object.assign(new Error("not connected"), { code: "offline" }));
        return;
      }
      const waiter = { resolve, reject, conversation, before };
      // An answer that never comes (the frame was refused before it was read) ends in a timeout.
      waiter.timer = setTimeout(() => this._settleHistory(waiter, null, { code: "timeout", message: "no answer" }),
        HISTORY_TIMEOUT_MS);
      this._historyWaiting.push(waiter);
    });
  }

  _settleHistory(waiter, page, error) {
    const index = this._historyWaiting.indexOf(waiter);
    if (index < 0) return;
    this._historyWaiting.splice(index, 1);
    clearTimeout(waiter.timer);
    if (page) waiter.resolve(page);
    else waiter.reject(Object.assign(new Error(error.message), { code: error.code }));
  }

  // -- events and the websocket -----------------------------------------------

  on(type, listener) { return addListener(this._listeners, type, listener); }

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

  _emit(type, message, conversation = null) {
    for (const listeners of [this._listeners, conversation && conversation._listeners]) {
      for (const listener of (listeners && listeners.get(type)) || []) {
        try { listener(message); } catch (err) { console.error("talkgate listener failed", err); }
      }
    }
  }

  _setStatus(status, detail = {}) {
    this.status = status;
    this._emit("status", { status, ...detail });
  }

  // Picks the conversation the short forms act on, without telling; true if it changed.
  _pick(id) {
    if (id === this._currentId || !this.conversations.has(id)) return false;
    this._currentId = id;
    return true;
  }

  // Which conversation a message belongs to (a gateway that names none: the only one).
  _route(message) {
    if (!SCOPED.has(message.type)) return null;
    if (!("conversation" in message) && this.conversations.size === 1) {
      message.conversation = this.conversations.keys().next().value;
    }
    const id = message.conversation;
    if (id == null) return null;
    if (message.type === "joined" && !this.conversations.has(id)) this.conversations.set(id, new Conversation(this, id));
    return this.conversations.get(id) || null;
  }

  _receive(message) {
    const before = this._currentId;
    if (message.type === "shutdown") {
      // The gateway is draining: when it closes us, come back after its hint (plus
      // jitter, so that every client of a restarted gateway does not return at once).
      this._retryAfterMs = message.retry_after_ms;
    }
    const conversation = this._route(message);
    if (message.type === "history") {
      // The answer to the oldest request it echoes (one refused unread, e.g. rate-limited, gets none).
      const waiter = this._historyWaiting.find((w) => w.conversation === message.conversation && w.before === message.before);
      if (waiter) this._settleHistory(waiter, message);
    }
    if (message.type === "error" && message.request === "history" && this._historyWaiting.length) {
      this._settleHistory(this._historyWaiting[0], null, message);
    }
    if (message.type === "joined") {
      this._attempt = 0;
      this._lastJoined = message;
      this.me = { identity: message.identity, role: message.role, name: message.name };
      if (message.capacity != null) this.capacity = message.capacity;
      if (conversation) {
        if (this._joinedSinceOpen) this._joinedSinceOpen.add(conversation.id);
        if (!this.current || this._accepting === conversation.id) this._pick(conversation.id);
        if (this._accepting === conversation.id) this._accepting = null;
      }
      if (message.role !== "agent") this._forgetUnjoined(); // a customer is in one conversation
    }
    // An agent's join is answered with its conversations' "joined", then "queue".
    if (message.type === "queue") this._forgetUnjoined();
    if (conversation) conversation._receive(message);
    if (message.type === "joined") this._setStatus("open");
    if (message.type === "left" && conversation) this._drop(conversation);
    this._emit(message.type, message, conversation);
    if (this._currentId !== before) this._emit("select", { conversation: this._currentId });
  }

  _drop(conversation) {
    this.conversations.delete(conversation.id);
    if (this._currentId === conversation.id) {
      const next = this.conversations.keys().next();
      this._currentId = next.done ? null : next.value;
    }
  }

  // After a reconnect, conversations the gateway did not join us to again are over for
  // us (left while we were away): they end here with a "left".
  _forgetUnjoined() {
    const kept = this._joinedSinceOpen;
    if (!kept) return;
    this._joinedSinceOpen = null;
    for (const conversation of [...this.conversations.values()]) {
      if (kept.has(conversation.id)) continue;
      conversation._endCall(false);
      this._drop(conversation);
      this._emit("left", { type: "left", conversation: conversation.id }, conversation);
    }
  }

  _open() {
    this._setStatus(this._attempt ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this._joinedSinceOpen = new Set();
      const join = this.token ? { type: "join", token: this.token } : { type: "join", ...this.joinFields };
      ws.send(JSON.stringify(join));
      this._keepalive = setInterval(() => this.send({ type: "ping" }), KEEPALIVE_MS);
    };
    ws.onmessage = (event) => {
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      if (message && typeof message.type === "string") this._receive(message);
    };
    ws.onclose = (event) => {
      clearInterval(this._keepalive);
      if (this.ws !== ws) return;
      for (const waiter of [...this._historyWaiting]) {
        this._settleHistory(waiter, null, { code: "offline", message: "the connection closed" });
      }
      if (this._closedByUser || FINAL_CLOSE_CODES.has(event.code)) {
        for (const conversation of this.conversations.values()) conversation._endCall(false);
        this._setStatus("closed", { code: event.code, reason: event.reason });
        return;
      }
      // The gateway closed our peer connections with the session: renegotiate after rejoining.
      for (const conversation of this.conversations.values()) conversation._suspend();
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

function addListener(map, type, listener) {
  if (!map.has(type)) map.set(type, new Set());
  map.get(type).add(listener);
  return () => map.get(type).delete(listener);
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

export function formatDate(ts) {
  return new Date(ts).toLocaleString([], { weekday: "short", day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });
}

const MIC_SVG = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 14a3 3 0 0 0 3-3V5a3 3 0 0 0-6 0v6a3 3 0 0 0 3 3zm5-3a5 5 0 0 1-10 0H5a7 7 0 0 0 6 6.92V21h2v-3.08A7 7 0 0 0 19 11z" fill="currentColor"/></svg>';

// The mark of a spoken turn: a microphone and a word ("spoken", or "speaking…" while partial).
function spokenLabel(text) {
  const mic = el("span", { class: "mic" });
  mic.innerHTML = MIC_SVG;
  return el("span", { class: "spoken-label", title: "Said aloud on the call (transcript)" }, mic, text);
}

// One chat message as a node: a bubble, or a system line. A spoken turn (`spoken`: a final
// transcript of what the customer or the bot said aloud) is a bubble marked as spoken.
// `mine` is the identity of whoever is looking at the page.
export function messageNode(message, mine) {
  const from = message.from || {};
  if (from.role === "system") {
    return el("div", { class: "msg system notice", dataset: { id: message.id || "" } }, el("span", {}, message.text));
  }
  const own = from.identity === mine;
  const spoken = message.spoken ? " spoken" : "";
  return el("div", { class: `msg ${own ? "own" : "other"} role-${from.role}${spoken}`, dataset: { id: message.id || "" } },
    own ? null : el("div", { class: "msg-author" }, from.name || from.identity),
    el("div", { class: "msg-bubble" }, message.text),
    el("div", { class: "msg-meta" },
      message.spoken ? spokenLabel("spoken") : null,
      message.spoken ? " · " : null,
      formatTime(message.ts)));
}

// Appends a node to a message list, following the newest unless the reader scrolled up.
function appendToLog(list, node, follow = false) {
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.append(node);
  if (nearBottom || follow) list.scrollTop = list.scrollHeight;
  return node;
}

// Renders one chat message (or a system line) into a message list.
export function renderMessage(list, message, mine) {
  return appendToLog(list, messageNode(message, mine), (message.from || {}).identity === mine);
}

// A live "transcript" message: a final one becomes a spoken bubble from whoever spoke;
// a partial one is a single in-progress line per speaker, updated in place and replaced
// by its final one (partials never pile up).
export function renderTranscript(list, message, mine) {
  const speaker = message.speaker || message.from || {};
  const live = [...list.querySelectorAll(".msg.transcript-live")].find((n) => n.dataset.speaker === speaker.identity);
  if (!message.final) {
    if (live) {
      live.querySelector(".msg-bubble").textContent = message.text;
      return live;
    }
    const own = speaker.identity === mine;
    return appendToLog(list, el("div", {
      class: `msg ${own ? "own" : "other"} role-${speaker.role} spoken transcript-live`,
      dataset: { id: "", speaker: speaker.identity },
    },
    own ? null : el("div", { class: "msg-author" }, speaker.name || speaker.identity),
    el("div", { class: "msg-bubble" }, message.text),
    el("div", { class: "msg-meta" }, spokenLabel("speaking…"))));
  }
  if (live) live.remove();
  return renderMessage(list, { from: speaker, text: message.text, ts: message.ts || Date.now(), spoken: true }, mine);
}

// A quiet system line (someone joined or left, a call started or ended, a hand-over).
export function noticeNode(text, ts = null) {
  return el("div", { class: "msg system notice", title: ts ? formatDate(ts) : null }, el("span", {}, text));
}

export function renderNotice(list, text, ts = null) {
  return appendToLog(list, noticeNode(text, ts), true);
}

// Calls seen from the thread: who started, joined or hung up a conversation's call and
// when it ended (from the gateway's "media" messages: who sends audio or video), reported
// as `notice(conversation id, text)` for a quiet system line. What is on when a
// conversation is joined (or joined again) is the starting point, not news.
export function watchCalls(client, notice) {
  const calls = new Map(); // conversation id -> { on: Set of identities sending, since }
  const nameOf = (id, identity) => {
    if (client.me && identity === client.me.identity) return "You";
    const p = client.conversation(id)?.participants.find((x) => x.identity === identity);
    return p ? p.name || p.identity : identity;
  };
  const duration = (ms) => {
    const seconds = Math.max(0, Math.round(ms / 1000));
    return `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
  };
  client.on("joined", (m) => {
    if (m.conversation == null) return;
    const on = new Set((m.media || []).filter((x) => x.audio || x.video).map((x) => x.identity));
    calls.set(m.conversation, { on, since: on.size ? Date.now() : null });
  });
  client.on("left", (m) => calls.delete(m.conversation));
  client.on("media", (m) => {
    const call = calls.get(m.conversation);
    if (!call) return;
    const sending = Boolean(m.audio || m.video);
    if (sending === call.on.has(m.identity)) return; // audio to video and the like: the same call
    const who = nameOf(m.conversation, m.identity);
    if (sending) {
      notice(m.conversation, call.on.size ? `${who} joined the call` : `${who} started a call`);
      if (!call.on.size) call.since = Date.now();
      call.on.add(m.identity);
    } else {
      call.on.delete(m.identity);
      notice(m.conversation, call.on.size ? `${who} hung up` : `Call ended · ${duration(Date.now() - call.since)}`);
    }
  });
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
    // Sends the input's text as chat through `getClient()` (to its current conversation) on
    // submit; keeps the text if offline.
    bindComposer(getClient) {
      composer.addEventListener("submit", (event) => {
        event.preventDefault();
        const text = input.value.trim();
        if (text && getClient()?.chat(text)) input.value = "";
      });
    },
  };
  return chrome;
}

export function randomId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
