// Customer page: a support chat widget. Token from ?token=...; on a --dev
// server without a token it joins a fresh conversation as a random guest.
import { connect, pageChrome, renderMessage, renderNotice, renderTranscript, randomId, watchCalls } from "/static/talkgate.js";
import { mountCall } from "/static/call.js";

const $ = (id) => document.getElementById(id);
const messages = $("messages");
const input = $("chat-input");
const send = $("send");
const escalateButton = $("escalate");
const ui = pageChrome({ status: $("status"), banner: $("banner"), composer: $("composer"), input });

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
mountCall(client, { notify: (text) => ui.banner(text, "info", 5000) });
let me = null;
let agentPresent = false;
let bot = null; // the speech bot in the conversation, if the gateway has one
let waiting = false;
const intro = $("intro");

function refreshControls() {
  const live = client.status === "open";
  input.disabled = !live;
  send.disabled = !live;
  escalateButton.disabled = !live || agentPresent || waiting;
  escalateButton.textContent = agentPresent ? "An agent is here" : waiting ? "Waiting for an agent…" : "Talk to a human";
  if (live) {
    // Say who answers: nobody does until "Talk to a human" when there is no bot.
    ui.status(agentPresent ? "You're chatting with an agent" : waiting ? "Waiting for an agent"
      : bot ? `${bot.name} is answering` : "Agents available on request", "open");
    intro.textContent = agentPresent || waiting ? "Hi! Ask us anything about your service."
      : bot ? `Hi! ${bot.name} answers right away. Press Talk to a human to reach a person.`
      : "Hi! Press Talk to a human and an agent will join this chat.";
  }
}

client.on("status", (event) => {
  ui.connection(event);
  if (event.status === "closed") {
    ui.status("Disconnected", "closed");
    if (!me) intro.hidden = true; // never connected: the banner says why
    if (event.code === 4409) ui.banner("This chat is now open in another tab or window.", "info");
  }
  refreshControls();
});

client.on("joined", (msg) => {
  me = msg.identity;
  ui.banner("");
  messages.querySelectorAll(".msg[data-id]").forEach((n) => n.remove());
  agentPresent = msg.participants.some((p) => p.role === "agent");
  bot = msg.participants.find((p) => p.role === "bot") || null;
  for (const m of msg.history) renderMessage(messages, m, me);
  refreshControls();
  input.focus();
});

client.on("chat", (msg) => {
  if (!messages.querySelector(`.msg[data-id="${CSS.escape(msg.id)}"]`)) renderMessage(messages, msg, me);
});

// What was said aloud on a call with the bot (its transcripts), as spoken bubbles.
client.on("transcript", (msg) => renderTranscript(messages, msg, me));
watchCalls(client, (_, text) => renderNotice(messages, text));

client.on("queued", () => { waiting = true; refreshControls(); });

client.on("participant.joined", (p) => {
  if (p.role === "agent") {
    agentPresent = true;
    waiting = false;
    renderNotice(messages, `${p.name} joined the conversation`);
  }
  if (p.role === "bot") bot = p;
  refreshControls();
});

client.on("participant.left", (p) => {
  if (p.role === "agent") {
    agentPresent = false;
    renderNotice(messages, `${p.name} left the conversation`);
  }
  if (p.role === "bot" && bot && bot.identity === p.identity) bot = null;
  refreshControls();
});

client.on("error", (err) => {
  if (err.request === "hangup") return; // the call is over either way
  if (err.code === "unauthorized" || err.code === "forbidden") {
    ui.status("Not connected", "closed");
    ui.banner(token ? "This support link is invalid or has expired. Please open the chat again from the app."
                    : "This page needs a sign-in link from the app (?token=…).");
  } else if (err.code === "rate_limited") {
    ui.banner("You're sending messages too quickly. Please wait a moment.", "info", 3000);
  } else {
    ui.banner(err.message, "info", 4000);
  }
});

ui.bindComposer(() => client);

escalateButton.addEventListener("click", () => {
  client.escalate();
  escalateButton.disabled = true;
});
