// call.js — voice and video controls shared by the customer page and the agent console.
//
// Consent rules: your own click turns on your own microphone or camera ("Call",
// "Video", or "Accept" on a request); a request from someone else only asks.
import { el } from "/static/talkgate.js";

const $ = (id) => document.getElementById(id);

// The prompt, video area and call bar, built into the page's #call-panel.
function buildPanel(panel) {
  panel.replaceChildren(
    el("div", { class: "prompt", id: "prompt", hidden: true, role: "alertdialog", "aria-labelledby": "prompt-text" },
      el("p", { id: "prompt-text" }),
      el("div", { class: "prompt-actions" },
        el("button", { type: "button", class: "btn secondary small", id: "prompt-decline" }, "Decline"),
        el("button", { type: "button", class: "btn primary small", id: "prompt-accept" }, "Accept"))),
    el("div", { class: "media-area", id: "media-area", hidden: true },
      el("video", { id: "remote-video", autoplay: true, playsinline: true }),
      el("video", { id: "local-video", autoplay: true, playsinline: true, muted: true, hidden: true })),
    el("div", { class: "call-bar", id: "call-bar", hidden: true },
      el("span", { class: "call-status", id: "call-status" }, "Connecting…"),
      el("button", { type: "button", class: "btn ghost small", id: "mute", "aria-pressed": "false" }, "Mute"),
      el("button", { type: "button", class: "btn ghost small", id: "camera" }, "Camera on"),
      el("button", { type: "button", class: "btn danger small", id: "hangup" }, "Hang up")),
    el("div", { id: "remote-audio", hidden: true }),
  );
  // The muted attribute does not set the property on a created element.
  $("local-video").muted = true;
}

export function mountCall(client, { notify }) {
  buildPanel($("call-panel"));
  const ui = {
    call: $("call"), video: $("video"), bar: $("call-bar"), status: $("call-status"), mute: $("mute"),
    camera: $("camera"), hangup: $("hangup"), prompt: $("prompt"), promptText: $("prompt-text"),
    accept: $("prompt-accept"), decline: $("prompt-decline"), area: $("media-area"),
    remoteVideo: $("remote-video"), localVideo: $("local-video"), sinks: $("remote-audio"),
  };
  let me = null;
  let others = 0; // participants other than me
  let connectedAt = null;
  let timer = null;
  let pending = null; // the upgrade request shown in the prompt
  const mine = new Map(); // id -> media of requests I sent

  function refresh() {
    const inCall = client.inCall;
    const live = client.status === "open";
    ui.call.disabled = !live || others === 0 || Boolean(client.local.audio);
    ui.video.disabled = !live || others === 0 || Boolean(client.local.video);
    ui.call.title = others === 0 ? "Calls start once someone else is in the conversation" : "Start a voice call";
    ui.bar.hidden = !inCall;
    ui.mute.textContent = client.muted.audio ? "Unmute" : "Mute";
    ui.mute.setAttribute("aria-pressed", String(client.muted.audio));
    ui.camera.textContent = client.local.video ? "Camera off" : "Camera on";
    const remoteVideo = ui.remoteVideo.srcObject && ui.remoteVideo.dataset.live === "1";
    ui.area.hidden = !(remoteVideo || client.local.video);
    ui.localVideo.hidden = !client.local.video;
  }

  function tick() {
    if (!connectedAt) return;
    const s = Math.floor((Date.now() - connectedAt) / 1000);
    ui.status.textContent = `${client.local.video ? "Video" : "Voice"} · ${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  async function start(media) {
    try {
      await client.startVoice();
      if (media === "video") await client.startVideo();
    } catch (err) {
      notify(`Could not use your ${media === "video" ? "camera" : "microphone"}: ${err.message}`);
    }
    refresh();
  }

  async function request(media) {
    await start(media);
    if ((media === "audio" && client.local.audio) || (media === "video" && client.local.video)) client.upgrade(media);
  }

  ui.call.addEventListener("click", () => request("audio"));
  ui.video.addEventListener("click", () => request("video"));
  ui.mute.addEventListener("click", () => { client.mute("audio", !client.muted.audio); refresh(); });
  ui.camera.addEventListener("click", async () => {
    if (client.local.video) client.stopVideo(); else await start("video");
    refresh();
  });
  ui.hangup.addEventListener("click", () => client.hangUp());
  ui.accept.addEventListener("click", async () => {
    const { id, media } = pending;
    hidePrompt();
    client.replyUpgrade(id, true);
    await start(media);
  });
  ui.decline.addEventListener("click", () => { client.replyUpgrade(pending.id, false); hidePrompt(); });

  function hidePrompt() { pending = null; ui.prompt.hidden = true; }

  client.on("joined", (msg) => { me = msg.identity; others = msg.participants.length - 1; refresh(); });
  client.on("participant.joined", () => { others += 1; refresh(); });
  client.on("participant.left", () => { others = Math.max(0, others - 1); refresh(); });
  client.on("left", () => { others = 0; client.hangUp(); hidePrompt(); refresh(); });
  client.on("status", refresh);

  client.on("upgrade.request", (msg) => {
    if (msg.from.identity === me) { mine.set(msg.id, msg.media); return; }
    const already = msg.media === "video" ? client.local.video : client.local.audio;
    if (already) { client.replyUpgrade(msg.id, true); return; } // nothing to turn on
    pending = msg;
    ui.promptText.textContent = msg.media === "video"
      ? `${msg.from.name} would like to turn on video.`
      : `${msg.from.name} would like to start a voice call.`;
    ui.accept.textContent = msg.media === "video" ? "Turn on my camera" : "Accept call";
    ui.prompt.hidden = false;
  });

  client.on("upgrade.reply", (msg) => {
    const media = mine.get(msg.id);
    if (!media) return;
    mine.delete(msg.id);
    if (!msg.accept) {
      notify(`${msg.from.name} declined ${media === "video" ? "video" : "the call"}.`);
      if (media === "video") client.stopVideo(); else client.hangUp();
      refresh();
    }
  });

  client.on("track", ({ track, kind }) => {
    if (kind === "audio") {
      const audio = el("audio", { autoplay: true });
      audio.srcObject = new MediaStream([track]);
      ui.sinks.append(audio);
      track.addEventListener("ended", () => audio.remove());
    } else {
      ui.remoteVideo.srcObject = new MediaStream([track]);
      const live = (on) => { ui.remoteVideo.dataset.live = on ? "1" : ""; refresh(); };
      track.addEventListener("unmute", () => live(true));
      track.addEventListener("mute", () => live(false));
      track.addEventListener("ended", () => live(false));
      live(!track.muted);
    }
  });

  client.on("localtrack", ({ kind, track }) => {
    if (kind === "video") ui.localVideo.srcObject = track ? new MediaStream([track]) : null;
    refresh();
  });

  client.on("call", ({ state }) => {
    clearInterval(timer);
    if (state === "connected") {
      connectedAt = connectedAt || Date.now();
      tick();
      timer = setInterval(tick, 1000);
    } else if (state === "connecting") {
      ui.status.textContent = "Connecting…";
    } else if (state === "failed") {
      ui.status.textContent = "Call failed: check your network";
    } else {
      connectedAt = null;
      ui.sinks.replaceChildren();
      ui.remoteVideo.srcObject = null;
      ui.localVideo.srcObject = null;
    }
    refresh();
  });

  client.on("media", (msg) => {
    if (msg.identity !== me && !msg.video) { ui.remoteVideo.dataset.live = ""; refresh(); }
  });

  refresh();
}
