// Agent console: the live queue, accept, and the conversation's chat.
// Token from ?token=...; on a --dev server without a token it asks for a name.
import { connect, el, initials, pageChrome, renderMessage, renderNotice, randomId } from "/static/talkgate.js";
import { mountCall } from "/static/call.js";

const $ = (id) => document.getElementById(id);
const messages = $("messages");
const queueList = $("queue-list");
const ui = pageChrome({ status: $("status"), banner: $("banner"), composer: $("composer"), input: $("chat-input") });

let client = null;
let me = null;
let conversation = null;
let participants = [];
let waiting = [];

function waitedFor(since) {
  const seconds = Math.max(0, Math.floor((Date.now() - since) / 1000));
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 60 ? `${minutes}m ${seconds % 60}s` : `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

function renderQueue() {
  queueList.replaceChildren(...waiting.map((entry) => el("li", { class: "queue-item", dataset: { conversation: entry.conversation } },
    el("span", { class: "avatar" }, initials(entry.customer.name)),
    el("div", { class: "queue-text" },
      el("strong", {}, entry.customer.name),
      el("span", { class: "muted small" }, `${entry.reason.replace(/_/g, " ")} · waiting `,
        el("span", { class: "waited", dataset: { since: entry.since } }, waitedFor(entry.since)))),
    el("button", {
      class: "btn primary small accept",
      type: "button",
      disabled: Boolean(conversation),
      title: conversation ? "Close your current conversation first" : "Join this conversation",
      onclick: () => client.accept(entry.conversation),
    }, "Accept"))));
  $("queue-count").textContent = String(waiting.length);
  $("queue-empty").hidden = waiting.length > 0;
  document.title = waiting.length ? `(${waiting.length}) Agent console · talkgate` : "Agent console · talkgate";
}

function renderConversation() {
  if (client && client.status === "open") ui.status(conversation ? "In a conversation" : "Available", "open");
  $("no-conversation").hidden = Boolean(conversation);
  $("conversation").hidden = !conversation;
  const customer = participants.find((p) => p.role === "customer");
  $("customer-name").textContent = customer ? customer.name : "Customer has left";
  $("participants").textContent = participants.map((p) => `${p.name} (${p.role})`).join(" · ");
}

function start(options) {
  client = connect("/ws", options);
  window.talkgate = client;
  mountCall(client, { notify: (text) => ui.banner(text, "info", 5000) });

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
    conversation = msg.conversation;
    participants = msg.participants;
    messages.replaceChildren();
    for (const m of msg.history) renderMessage(messages, m, me);
    renderConversation();
    renderQueue();
    if (conversation) $("chat-input").focus();
  });

  client.on("queue", (msg) => { waiting = msg.waiting; renderQueue(); });

  client.on("chat", (msg) => { if (conversation) renderMessage(messages, msg, me); });

  client.on("participant.joined", (p) => {
    participants = participants.filter((q) => q.identity !== p.identity).concat([p]);
    renderNotice(messages, `${p.name} joined`);
    renderConversation();
  });

  client.on("participant.left", (p) => {
    participants = participants.filter((q) => q.identity !== p.identity);
    renderNotice(messages, `${p.name} left the conversation`);
    renderConversation();
  });

  client.on("left", () => {
    conversation = null;
    participants = [];
    messages.replaceChildren();
    renderConversation();
    renderQueue();
  });

  client.on("error", (err) => {
    if (err.code === "unauthorized" || err.code === "forbidden") {
      ui.status("Offline", "closed");
      ui.banner("Your sign-in link is invalid or has expired. Open the console again from your admin tools.");
    } else if (err.code === "conflict" && err.message.includes("accepted")) {
      ui.banner("Another agent already took that customer.", "info", 4000);
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

const token = new URLSearchParams(location.search).get("token");
if (token) {
  start({ token });
} else {
  const saved = JSON.parse(sessionStorage.getItem("talkgate.agent") || "null");
  if (saved) {
    start({ join: saved });
  } else {
    $("signin").hidden = false;
    $("console").hidden = true;
    ui.status("Signed out", "closed");
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
