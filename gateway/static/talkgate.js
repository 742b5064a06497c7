// talkgate.js — a small browser client for the talkgate gateway (no build step).
//
//   import { connect } from "/static/talkgate.js";
//   const tg = connect("/ws", { token });            // or { join: {room, identity, role, name} } on a --dev server
//   tg.on("joined", (m) => ...); tg.on("chat", (m) => ...); tg.on("error", (m) => ...);
//   tg.chat("hello"); tg.escalate(); tg.accept("r1"); tg.leave();
//
// Every server message is emitted as an event named after its "type" (the
// message is the listener's argument). "status" events report the connection:
// "connecting", "open", "reconnecting", "closed". After a dropped connection the
// client reconnects with backoff and joins again; the gateway treats that as a
// reload (same identity replaces the old session) and sends the history again.

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
    this._open();
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
      if (message.type === "joined") {
        this._attempt = 0;
        this.joined = message;
        this._setStatus("open");
      }
      this._emit(message.type, message);
    };
    ws.onclose = (event) => {
      clearInterval(this._keepalive);
      if (this.ws !== ws) return;
      if (this._closedByUser || FINAL_CLOSE_CODES.has(event.code)) {
        this._setStatus("closed", { code: event.code, reason: event.reason });
        return;
      }
      const delay = BACKOFF_MS[Math.min(this._attempt, BACKOFF_MS.length - 1)];
      this._attempt += 1;
      this._setStatus("reconnecting", { code: event.code, inMs: delay });
      this._retryTimer = setTimeout(() => this._open(), delay);
    };
  }
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
