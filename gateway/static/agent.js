// Agent console: the live queue, accept, and the chat and call of each conversation the
// agent holds (several when the gateway allows it: --agent-capacity; then they are listed
// and the selected one is shown). Token from ?token=...; on a --dev server without a
// token it asks for a name, on any other server it says that a sign-in link from the app
// is needed.
import { connect, el, initials, pageChrome, renderMessage, renderNotice, randomId } from "/static/talkgate.js";
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
// conversation id -> { id, log (its .messages element), unread, draft, preview, atBottom, scrollTop }
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
    t = { id, log, unread: 0, draft: "", preview: "", atBottom: true, scrollTop: 0 };
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
  renderList();
  renderQueue();
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
