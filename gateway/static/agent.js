// Agent console: the live queue, accept, and the chat and call of each conversation the
// agent holds (several when the gateway allows it: --agent-capacity; then they are listed
// and the selected one is shown), with the customer panel beside it (who the customer is,
// their earlier conversations, each openable as a read-only timeline paged with
// "history"). Token from ?token=...; on a --dev server without a token it asks for a
// name, on any other server it says that a sign-in link from the app is needed.
import {
  connect, el, formatDate, formatTime, initials, messageNode, noticeNode, pageChrome, renderMessage, renderNotice,
  renderTranscript, randomId, watchCalls,
} from "/static/talkgate.js";
import { mountCall } from "/static/call.js";

const $ = (id) => document.getElementById(id);
const threadsArea = $("messages");
const queueList = $("queue-list");
const mineList = $("mine-list");
const input = $("chat-input");
const ui = pageChrome({ status: $("status"), banner: $("banner"), composer: $("composer"), input });
const SELECTED_KEY = "talkgate.agent.selected"; // the selected conversation, across reloads

let client = null;
let callUi = null;
let me = null;
let waiting = [];
let capacity = null; // conversations we may hold: from the gateway, or learned from a refusal
// conversation id -> { id, log (its .messages element), unread, draft, preview, atBottom, scrollTop,
//   card (the customer card from its "joined": profile, earlier conversations) }
const threads = new Map();
let shown = null; // the thread on screen

const PHONE = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M6.6 10.8a15.1 15.1 0 0 0 6.6 6.6l2.2-2.2a1 1 0 0 1 1-.25 11.4 11.4 0 0 0 3.6.57 1 1 0 0 1 1 1V20a1 1 0 0 1-1 1A17 17 0 0 1 3 4a1 1 0 0 1 1-1h3.5a1 1 0 0 1 1 1c0 1.25.2 2.45.57 3.6a1 1 0 0 1-.25 1z" fill="currentColor"/></svg>';

function waitedFor(since) {
  const seconds = Math.max(0, Math.floor((Date.now() - since) / 1000));
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 60 ? `${minutes}m ${seconds % 60}s` : `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

function thread(id) {
  let t = threads.get(id);
  if (!t) {
    const log = el("div", { class: "messages", role: "log", "aria-live": "polite", dataset: { conversation: id }, hidden: true });
    threadsArea.append(log);
    t = { id, log, unread: 0, draft: "", preview: "", atBottom: true, scrollTop: 0, card: null };
    threads.set(id, t);
  }
  return t;
}

const customerOf = (id) => client.conversation(id)?.participants.find((p) => p.role === "customer") || null;
const current = () => (client && client.current ? client.current.id : null);
// Whether another conversation may be accepted. Unknown capacity: let the agent try (the
// gateway refuses over its --agent-capacity, and the refusal teaches us the limit).
const canAccept = () => capacity === null || threads.size < capacity;
// The list of conversations shows once the agent can hold more than one.
const listed = () => threads.size > 1 || (capacity !== null && capacity > 1 && threads.size > 0);

function renderQueue() {
  const open = canAccept();
  const title = !open ? (threads.size === 1 ? "Close your current conversation first" : "Close a conversation first")
    : threads.size ? "Take this conversation too" : "Join this conversation";
  queueList.replaceChildren(...waiting.map((entry) => el("li", { class: "queue-item", dataset: { conversation: entry.conversation } },
    el("span", { class: "avatar" }, initials(entry.customer.name)),
    el("div", { class: "queue-text" },
      el("strong", {}, entry.customer.name),
      el("span", { class: "muted small" }, `${entry.reason.replace(/_/g, " ")} · waiting `,
        el("span", { class: "waited", dataset: { since: entry.since } }, waitedFor(entry.since)))),
    el("button", {
      class: "btn primary small accept",
      type: "button",
      disabled: !open,
      title,
      onclick: () => client.accept(entry.conversation),
    }, "Accept"))));
  $("queue-count").textContent = String(waiting.length);
  $("queue-empty").hidden = waiting.length > 0;
  const unread = [...threads.values()].reduce((n, t) => n + t.unread, 0);
  const counts = unread ? `${unread} unread${waiting.length ? `, ${waiting.length} waiting` : ""}` : waiting.length || "";
  document.title = counts ? `(${counts}) Agent console · talkgate` : "Agent console · talkgate";
}

function renderList() {
  $("mine").hidden = !listed();
  $("mine-count").textContent = String(threads.size);
  mineList.replaceChildren(...[...threads.values()].map((t) => {
    const conversation = client.conversation(t.id);
    const customer = customerOf(t.id);
    const selected = t.id === current();
    const request = callUi && callUi.pending(t.id);
    const phone = el("span", { class: "flag call", title: "On a call" });
    phone.innerHTML = PHONE;
    return el("li", {},
      el("button", {
        type: "button",
        class: `mine-item${selected ? " selected" : ""}${t.unread ? " unread" : ""}`,
        dataset: { conversation: t.id },
        "aria-current": selected ? "true" : null,
        onclick: () => client.select(t.id),
      },
      el("span", { class: "avatar" }, initials(customer ? customer.name : "?")),
      el("span", { class: "mine-text" },
        el("strong", {}, customer ? customer.name : "Customer has left"),
        el("span", { class: "muted small preview" }, request ? `Asks for ${request.media === "video" ? "video" : "a call"}` : t.preview)),
      conversation && conversation.inCall ? phone : null,
      request ? el("span", { class: "flag ask", title: "Waiting for your answer" }, "!") : null,
      t.unread ? el("span", { class: "unread-count", title: `${t.unread} unread` }, String(t.unread)) : null));
  }));
}

// Shows the current conversation (its log, header and draft).
function renderConversation() {
  const id = current();
  const t = id ? threads.get(id) : null;
  if (shown !== t) {
    if (shown) {
      shown.atBottom = shown.log.scrollHeight - shown.log.scrollTop - shown.log.clientHeight < 80;
      shown.scrollTop = shown.log.scrollTop;
      shown.draft = input.value;
      shown.log.hidden = true;
    }
    shown = t;
    if (t) {
      t.log.hidden = false;
      t.log.scrollTop = t.atBottom ? t.log.scrollHeight : t.scrollTop;
      t.unread = 0;
      input.value = t.draft;
      sessionStorage.setItem(SELECTED_KEY, t.id);
    }
  }
  if (client && client.status === "open") {
    ui.status(threads.size > 1 ? `In ${threads.size} conversations` : threads.size ? "In a conversation" : "Available", "open");
  }
  $("no-conversation").hidden = Boolean(t);
  $("conversation").hidden = !t;
  const participants = id ? client.conversation(id).participants : [];
  const customer = id ? customerOf(id) : null;
  $("customer-name").textContent = customer ? customer.name : "Customer has left";
  $("participants").textContent = participants.map((p) => `${p.name} (${p.role})`).join(" · ");
  input.placeholder = customer && listed() ? `Reply to ${customer.name}…` : "Reply to the customer…";
  renderPanel(t);
  renderList();
  renderQueue();
}

// -- the customer panel: who the customer is, and their earlier conversations -------------

const panel = { thread: null, card: null, timeline: null }; // what it shows now
const CHANNEL_LABELS = { chat: "Chat", voice: "Voice", video: "Video" };
const PAGE = 30; // timeline events per history request

function profileValue(value) {
  return value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
}

function profileLabel(key) {
  const words = key.replace(/[_-]+/g, " ").trim();
  return words.length <= 3 ? words.toUpperCase() : words[0].toUpperCase() + words.slice(1);
}

// Shows the card of the conversation on screen (unchanged while it stays on screen).
function renderPanel(t) {
  const card = t ? t.card : null;
  $("console").classList.toggle("with-panel", Boolean(card));
  $("customer-panel").hidden = !card;
  if (panel.thread === t && panel.card === card) return;
  panel.thread = t;
  panel.card = card;
  closeTimeline();
  if (!card) return;
  $("panel-avatar").textContent = initials(card.name);
  $("panel-name").textContent = card.name;
  $("panel-identity").textContent = card.identity;
  const profile = Object.entries(card.profile || {});
  $("panel-profile").hidden = profile.length === 0;
  $("panel-profile").replaceChildren(...profile.flatMap(([key, value]) => [
    el("dt", {}, profileLabel(key)), el("dd", {}, profileValue(value))]));
  const previous = card.previous || [];
  $("panel-previous-count").textContent = String(previous.length);
  $("panel-no-previous").hidden = previous.length > 0;
  $("panel-previous").replaceChildren(...previous.map((p) => el("li", {},
    el("button", {
      type: "button", class: "previous-item", dataset: { conversation: p.conversation },
      title: "Open this conversation (read-only)", onclick: () => openTimeline(p),
    },
    el("span", { class: "previous-when" }, formatDate(p.opened)),
    el("span", { class: "channels" }, ...(p.channels || []).map((c) => el("span", { class: `channel ${c}` }, CHANNEL_LABELS[c] || c))),
    el("span", { class: "previous-last muted small" }, p.last_message ? `“${p.last_message}”` : "No messages")))));
}

function closeTimeline() {
  panel.timeline = null;
  $("panel-card").hidden = false;
  $("panel-timeline").hidden = true;
  $("timeline").replaceChildren();
}

// Opens an earlier conversation as a read-only timeline: its newest page, then "Load
// earlier" pages back while the gateway says there is more.
async function openTimeline(previous) {
  const view = { conversation: previous.conversation, first: null, more: false, loading: false };
  panel.timeline = view;
  $("panel-card").hidden = true;
  $("panel-timeline").hidden = false;
  $("timeline-title").textContent = formatDate(previous.opened);
  const sameDay = previous.closed && new Date(previous.closed).toDateString() === new Date(previous.opened).toDateString();
  const ended = previous.closed ? `ended ${sameDay ? formatTime(previous.closed) : formatDate(previous.closed)}` : "not closed";
  $("timeline-subtitle").textContent = `Read-only · ${(previous.channels || []).join(", ")} · ${ended}`;
  $("timeline").replaceChildren(el("div", { class: "msg system notice" }, el("span", {}, "Loading…")));
  await loadTimeline(view);
  $("timeline").scrollTop = $("timeline").scrollHeight;
}

async function loadTimeline(view) {
  if (view.loading) return;
  view.loading = true;
  const log = $("timeline");
  let page;
  try {
    page = await client.history(view.conversation, { before: view.first, limit: PAGE });
  } catch (err) {
    if (panel.timeline === view) log.replaceChildren(el("div", { class: "msg system notice" }, el("span", {}, `Could not load it: ${err.message}`)));
    return;
  } finally {
    view.loading = false;
  }
  if (panel.timeline !== view) return; // closed or replaced meanwhile
  const height = log.scrollHeight - log.scrollTop;
  log.querySelector(".load-earlier")?.remove();
  if (view.first === null) log.replaceChildren();
  const nodes = page.events.map((e) => timelineNode(e)).filter(Boolean);
  if (page.events.length) view.first = page.events[0].id;
  view.more = page.more;
  if (!view.more) nodes.unshift(el("div", { class: "msg system notice timeline-start" }, el("span", {}, "Start of the conversation")));
  else nodes.unshift(el("button", { type: "button", class: "btn ghost small load-earlier", onclick: () => loadTimeline(view) }, "Load earlier"));
  log.prepend(...nodes);
  log.scrollTop = log.scrollHeight - height; // what was on screen stays there
}

// One recorded event of a timeline (docs/protocol.md#history) as a node; null: not shown.
function timelineNode(e) {
  const who = e.from ? (e.from.identity === me ? "You" : e.from.name || e.from.identity) : "";
  const role = e.from ? e.from.role : "system";
  const line = (text) => { const n = noticeNode(text, e.ts); n.dataset.event = String(e.id); return n; };
  switch (e.type) {
    case "chat":
    case "transcript": {
      const node = messageNode({ id: e.ref || "", from: e.from, text: e.text, ts: e.ts, spoken: e.type === "transcript" }, me);
      node.dataset.event = String(e.id);
      return node;
    }
    case "participant.joined": return line(role === "bot" ? `${who} (bot) answered` : `${who} joined`);
    case "participant.left": return line(`${who} left`);
    case "queue.entered": return line(`Queued for an agent (${String(e.reason || "").replace(/_/g, " ")})`);
    case "queue.accepted": return line(`${who} accepted the conversation`);
    case "queue.left": return e.reason === "accepted" ? null : line("Left the queue");
    case "call.started": return line(`${who} joined the call`);
    case "call.ended": {
      const seconds = Math.round((e.duration_ms || 0) / 1000);
      const lasted = e.duration_ms == null ? "" : ` · ${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
      return line(`${who} left the call${lasted}`);
    }
    case "upgrade.requested": return line(`${who} asked for ${e.media === "video" ? "video" : "a voice call"}`);
    case "upgrade.answered": return line(`${who} ${e.accept ? "accepted" : "declined"} ${e.media === "video" ? "video" : "the call"}`);
    default: return null; // media, away/returned and later kinds: not in the read-only view
  }
}

// Something new in a conversation: mark it unread unless it is on screen.
function touched(id, preview) {
  const t = thread(id);
  if (preview !== undefined) t.preview = preview;
  if (id !== current()) t.unread += 1;
  renderList();
  renderQueue();
}

function start(options) {
  client = connect("/ws", options);
  window.talkgate = client;
  callUi = mountCall(client, { notify: (text) => ui.banner(text, "info", 5000), changed: renderList });

  client.on("status", (event) => {
    ui.connection(event);
    if (event.status === "closed") {
      ui.status("Offline", "closed");
      if (event.code === 4409) ui.banner("The console was opened in another tab; this one is offline.", "info");
    }
  });

  client.on("joined", (msg) => {
    me = msg.identity;
    ui.banner("");
    $("me-name").textContent = msg.name;
    $("me-avatar").textContent = initials(msg.name);
    if (client.capacity !== null) capacity = client.capacity;
    if (msg.conversation != null) {
      const t = thread(msg.conversation);
      t.card = msg.customer || null;
      t.log.replaceChildren();
      for (const m of msg.history) renderMessage(t.log, m, me);
      const last = msg.history[msg.history.length - 1];
      t.preview = last ? last.text : "";
      if (msg.conversation === sessionStorage.getItem(SELECTED_KEY)) client.select(msg.conversation);
    }
    renderConversation();
    if (current()) input.focus();
  });

  client.on("select", () => { renderConversation(); if (current()) input.focus(); });

  client.on("queue", (msg) => { waiting = msg.waiting; renderQueue(); });

  client.on("chat", (msg) => {
    const t = threads.get(msg.conversation);
    if (!t) return;
    renderMessage(t.log, msg, me);
    if (msg.from.identity === me) { t.preview = `You: ${msg.text}`; renderList(); } else touched(msg.conversation, msg.text);
  });

  // Spoken turns on a call with the bot (its transcripts), as spoken bubbles.
  client.on("transcript", (msg) => {
    const t = threads.get(msg.conversation);
    if (!t) return;
    renderTranscript(t.log, msg, me);
    if (msg.final) touched(msg.conversation, msg.text);
  });

  // Call start and end, who joined or hung up: quiet lines in the thread.
  watchCalls(client, (conversation, text) => {
    const t = threads.get(conversation);
    if (t) renderNotice(t.log, text);
  });

  client.on("participant.joined", (p) => {
    const t = threads.get(p.conversation);
    if (!t) return;
    renderNotice(t.log, `${p.name} joined`);
    renderConversation();
  });

  client.on("participant.left", (p) => {
    const t = threads.get(p.conversation);
    if (!t) return;
    renderNotice(t.log, `${p.name} left the conversation`);
    touched(p.conversation, `${p.name} left`);
    renderConversation();
  });

  // An upgrade request in a conversation that is not on screen: say where it waits.
  client.on("upgrade.request", (msg) => {
    if (msg.from.identity === me || msg.conversation === current()) return;
    touched(msg.conversation);
    const what = msg.media === "video" ? "turn on video" : "start a voice call";
    ui.banner(`${msg.from.name} would like to ${what}: open their conversation to answer.`, "info", 6000);
  });

  client.on("left", (msg) => {
    const t = threads.get(msg.conversation);
    if (t) {
      t.log.remove();
      threads.delete(msg.conversation);
      if (shown === t) shown = null;
    }
    renderConversation();
  });

  client.on("error", (err) => {
    if (err.request === "hangup") return; // the call is over either way
    if (err.code === "unauthorized" || err.code === "forbidden") {
      ui.status("Offline", "closed");
      ui.banner(options.token ? "Your sign-in link is invalid or has expired. Open the console again from your admin tools."
                              : "This console needs a sign-in link from your app or admin tools (/agent?token=…).");
    } else if (err.code === "conflict" && err.request === "accept" && err.message.includes("already accepted")) {
      ui.banner("Another agent already took that customer.", "info", 4000);
    } else if (err.code === "conflict" && err.request === "accept" && /before accepting another|--agent-capacity/.test(err.message)) {
      // Over our capacity: now we know it (the gateway's limit is what we hold).
      capacity = threads.size;
      ui.banner(threads.size > 1 ? "You have as many conversations as you can take: close one first."
                                 : "Close your current conversation before accepting another.", "info", 4000);
      renderConversation();
    } else {
      ui.banner(err.message, "info", 4000);
    }
  });
}

ui.bindComposer(() => client);
$("leave").addEventListener("click", () => client.leave());
$("timeline-back").addEventListener("click", closeTimeline);
setInterval(() => {
  for (const node of queueList.querySelectorAll(".waited")) node.textContent = waitedFor(Number(node.dataset.since));
}, 1000);

// Does the gateway take token-less joins (--dev)? /healthz says. Resolves true, false, or
// null when the gateway cannot be reached.
async function probeDevMode() {
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    if (!response.ok) return null;
    const health = await response.json();
    return typeof health.dev === "boolean" ? health.dev : null;
  } catch {
    return null;
  }
}

function signIn() {
  const saved = JSON.parse(sessionStorage.getItem("talkgate.agent") || "null");
  if (saved) {
    $("console").hidden = false;
    start({ join: saved });
  } else {
    $("signin").hidden = false;
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("agent-name").value.trim();
      if (!name) return;
      const join = { role: "agent", identity: randomId("agent-"), name };
      sessionStorage.setItem("talkgate.agent", JSON.stringify(join));
      $("signin").hidden = true;
      $("console").hidden = false;
      start({ join });
    });
  }
}

const token = new URLSearchParams(location.search).get("token");
if (token) {
  start({ token });
} else {
  ui.status("Signed out", "closed");
  $("console").hidden = true; // until we know whether to ask for a name
  probeDevMode().then((dev) => {
    if (dev) {
      signIn();
      return;
    }
    if (dev === null) {
      ui.banner("Cannot reach the gateway. Reload the page to try again.");
    } else {
      $("need-link").hidden = false;
    }
  });
}
