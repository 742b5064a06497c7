// Customer page: a support chat widget. Token from ?token=...; on a --dev
// server without a token it joins a fresh conversation as a random guest.
import { connect, renderMessage, renderNotice, randomId } from "/static/talkgate.js";

const $ = (id) => document.getElementById(id);
const messages = $("messages");
const input = $("chat-input");
const send = $("send");
const escalateButton = $("escalate");
const statusLine = $("status");
const banner = $("banner");

const params = new URLSearchParams(location.search);
const token = params.get("token");

function devIdentity() {
  // Kept per tab so a reload resumes the same conversation.
  let saved = JSON.parse(sessionStorage.getItem("talkgate.guest") || "null");
  if (!saved) {
    const id = randomId("guest-");
    saved = { identity: id, room: "c-" + id.slice(6), name: "Guest " + id.slice(-4).toUpperCase() };
    sessionStorage.setItem("talkgate.guest", JSON.stringify(saved));
  }
  return { role: "customer", ...saved };
}

const client = connect("/ws", token ? { token } : { join: devIdentity() });
window.talkgate = client; // for debugging and for tests
let me = null;
let agentPresent = false;
let waiting = false;

function setStatus(text, state) {
  statusLine.textContent = text;
  statusLine.dataset.status = state;
}

function showBanner(text, kind = "error") {
  banner.textContent = text;
  banner.className = `banner ${kind}`;
  banner.hidden = !text;
}

function refreshControls() {
  const live = client.status === "open";
  input.disabled = !live;
  send.disabled = !live;
  escalateButton.disabled = !live || agentPresent || waiting;
  escalateButton.textContent = agentPresent ? "An agent is here" : waiting ? "Waiting for an agent…" : "Talk to a human";
  if (live) {
    setStatus(agentPresent ? "You're chatting with an agent" : waiting ? "Waiting for an agent" : "Online", "open");
  }
}

client.on("status", ({ status, inMs, code }) => {
  if (status === "reconnecting") setStatus(`Reconnecting${inMs ? ` in ${Math.ceil(inMs / 1000)}s` : ""}…`, "reconnecting");
  if (status === "closed") {
    setStatus("Disconnected", "closed");
    if (code === 4409) showBanner("This chat is now open in another tab or window.", "info");
  }
  refreshControls();
});

client.on("joined", (msg) => {
  me = msg.identity;
  showBanner("");
  messages.querySelectorAll(".msg[data-id]").forEach((n) => n.remove());
  agentPresent = msg.participants.some((p) => p.role === "agent");
  for (const m of msg.history) renderMessage(messages, m, me);
  refreshControls();
  input.focus();
});

client.on("chat", (msg) => {
  if (!messages.querySelector(`.msg[data-id="${CSS.escape(msg.id)}"]`)) renderMessage(messages, msg, me);
});

client.on("queued", () => { waiting = true; refreshControls(); });

client.on("participant.joined", (p) => {
  if (p.role === "agent") {
    agentPresent = true;
    waiting = false;
    renderNotice(messages, `${p.name} joined the conversation`);
  }
  refreshControls();
});

client.on("participant.left", (p) => {
  if (p.role === "agent") {
    agentPresent = false;
    renderNotice(messages, `${p.name} left the conversation`);
  }
  refreshControls();
});

client.on("error", (err) => {
  if (err.code === "unauthorized" || err.code === "forbidden") {
    setStatus("Not connected", "closed");
    showBanner(token ? "This support link is invalid or has expired. Please open the chat again from the app."
                     : "This page needs a sign-in link from the app (?token=…).");
  } else if (err.code === "rate_limited") {
    showBanner("You're sending messages too quickly. Please wait a moment.", "info");
    setTimeout(() => showBanner(""), 3000);
  } else {
    showBanner(err.message, "info");
    setTimeout(() => showBanner(""), 4000);
  }
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  if (client.send({ type: "chat", text })) input.value = "";
});

escalateButton.addEventListener("click", () => {
  client.escalate();
  escalateButton.disabled = true;
});
