// call.js — voice and video controls shared by the customer page and the agent console.
//
// Consent rules: your own click turns on your own microphone or camera ("Call",
// "Video", or "Accept" on a request); a request from someone else only asks. Joining
// a call the others are already on ("Join call") asks nobody: they already send.
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
    el("div", { class: "call-notice", id: "call-notice", hidden: true },
      el("span", { id: "call-notice-text" }),
      el("button", { type: "button", class: "btn primary small", id: "join-call" }, "Join call")),
    el("div", { class: "media-area", id: "media-area", hidden: true },
      el("video", { id: "remote-video", autoplay: true, playsinline: true }),
      el("video", { id: "local-video", autoplay: true, playsinline: true, muted: true, hidden: true })),
    el("div", { class: "call-bar", id: "call-bar", hidden: true },
      el("span", { class: "recording", id: "recording", hidden: true, title: "This call is being recorded" }, "● Recording"),
      el("span", { class: "call-status", id: "call-status" }, "Connecting…"),
      el("button", { type: "button", class: "btn ghost small", id: "mute", "aria-pressed": "false" }, "Mute"),
      el("button", { type: "button", class: "btn ghost small", id: "camera" }, "Camera on"),
      el("button", { type: "button", class: "btn danger small", id: "hangup" }, "Hang up")),
    el("div", { id: "remote-audio", hidden: true }),
  );
  // The muted attribute does not set the property on a created element.
  $("local-video").muted = true;
}

// Mounts the call UI for `client`. It keeps a call state per conversation (who is on it,
// the prompt, the remote audio, which keeps playing whichever conversation is shown) and
// shows the client's current conversation; on a customer page that is the only one.
// `changed()` is called when a conversation's call or pending request changes (the agent
// console marks its list); the returned object says what waits in each conversation.
export function mountCall(client, { notify, changed = () => {} }) {
  buildPanel($("call-panel"));
  const ui = {
    call: $("call"), video: $("video"), bar: $("call-bar"), status: $("call-status"), mute: $("mute"),
    camera: $("camera"), hangup: $("hangup"), prompt: $("prompt"), promptText: $("prompt-text"),
    accept: $("prompt-accept"), decline: $("prompt-decline"), area: $("media-area"),
    remoteVideo: $("remote-video"), localVideo: $("local-video"), sinks: $("remote-audio"),
    notice: $("call-notice"), noticeText: $("call-notice-text"), join: $("join-call"),
    recording: $("recording"),
  };
  let me = null;
  let myRole = null;
  const calls = new Map(); // conversation id -> its call state (below)
  let timer = null;

  function call(id) {
    let s = calls.get(id);
    if (!s) {
      s = {
        id,
        others: new Map(), // identity -> participant: everyone else in the conversation
        sending: new Map(), // identity -> { audio, video }: what the gateway receives from them
        state: "idle", // the peer connection: idle | connecting | connected | failed
        since: null, // when someone else was first on the call with me (the timer's start)
        partnersBefore: new Map(), // identity -> name: who was on the call at the last sync
        ended: null, // { identity, name, how: "hung up" | "left" }: the last one who went, if nobody is on
        pending: null, // the upgrade request waiting for my answer
        mine: new Map(), // id -> media of requests I sent
        sinks: el("div", { dataset: { conversation: id } }), // <audio> per remote audio track
        remoteVideo: null, // MediaStream of the remote camera
        videoLive: false,
        localVideo: null, // MediaStream of my camera
        recording: false, // the gateway records this conversation's call
      };
      ui.sinks.append(s.sinks);
      calls.set(id, s);
    }
    return s;
  }
  const conversationOf = (s) => client.conversation(s.id);
  const inCall = (s) => Boolean(conversationOf(s)?.inCall);
  const local = (s) => conversationOf(s)?.local || { audio: null, video: null };

  // Whom my call is with (the gateway's routing): customers hear everyone; agents
  // hear customers and the bot, not each other.
  function counterparts(s) {
    return [...s.others.values()].filter((p) => myRole !== "agent" || p.role !== "agent");
  }
  const sends = (s, p, kind) => Boolean(s.sending.get(p.identity)?.[kind]);
  const onACall = (s, p) => sends(s, p, "audio") || sends(s, p, "video");
  // Who is on the call with me: counterparts sending media; a bot speaks on any call of its customer.
  function partners(s) {
    return inCall(s) ? counterparts(s).filter((p) => p.role === "bot" || onACall(s, p)) : [];
  }
  const names = (people) => people.map((p) => p.name || p.identity).join(", ");

  function clock(s) {
    const seconds = Math.floor((Date.now() - s.since) / 1000);
    return `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
  }

  function statusText(s, now) {
    if (s.state === "failed") return "Call failed: check your network";
    if (s.state !== "connected") return "Connecting…";
    if (now.length) return `${local(s).video ? "Video call" : "On a call"} with ${names(now)} · ${clock(s)}`;
    if (s.ended && s.ended.how === "hung up") return `${s.ended.name} hung up`;
    const invited = counterparts(s);
    if (invited.length) return `Waiting for ${names(invited)} to join the call…`;
    if (s.ended) return `${s.ended.name} left`;
    return "Waiting for someone to join the call…";
  }

  // Recomputes who is on a call (noting who hung up or left); returns who is on it now.
  function sync(s) {
    const now = partners(s);
    for (const [identity, name] of s.partnersBefore) {
      if (!now.some((p) => p.identity === identity)) s.ended = { identity, name, how: s.others.has(identity) ? "hung up" : "left" };
    }
    s.partnersBefore = new Map(now.map((p) => [p.identity, p.name || p.identity]));
    if (now.length) s.ended = null;
    if (!inCall(s)) { s.ended = null; s.since = null; }
    if (s.state === "connected" && now.length > 0) s.since = s.since || Date.now();
    return now;
  }

  function setVideo(video, stream) {
    if (video.srcObject !== stream) video.srcObject = stream;
  }

  // Syncs every conversation's call and draws the current one's.
  function refresh() {
    let shown = null;
    for (const s of calls.values()) {
      const now = sync(s);
      if (client.current && client.current.id === s.id) shown = { s, now };
    }
    const ticking = Boolean(shown && shown.s.since);
    if (ticking && !timer) timer = setInterval(refresh, 1000);
    if (!ticking && timer) { clearInterval(timer); timer = null; }
    draw(shown ? shown.s : null, shown ? shown.now : []);
  }

  function draw(s, now) {
    const live = client.status === "open";
    const mic = s ? local(s) : { audio: null, video: null };
    const callOn = Boolean(s && inCall(s));
    ui.status.textContent = s ? statusText(s, now) : "";
    const nobody = !s || s.others.size === 0;
    const onCall = s ? counterparts(s).filter((p) => onACall(s, p)) : [];
    const joinable = !callOn && onCall.length > 0; // they are on a call that I am not on yet
    ui.call.disabled = !live || nobody || Boolean(mic.audio);
    ui.video.disabled = !live || nobody || Boolean(mic.video);
    ui.call.title = nobody ? "Calls start once someone else is in the conversation"
      : joinable ? "Join the call" : "Start a voice call";
    const label = ui.call.querySelector(".label");
    if (label) label.textContent = joinable ? "Join call" : "Call";
    ui.notice.hidden = !joinable || !live;
    ui.noticeText.textContent = `${names(onCall)} ${onCall.length > 1 ? "are" : "is"} on a call`
      + (s && s.recording ? " (recorded)" : "");
    ui.bar.hidden = !callOn;
    // Everyone on a recorded call sees it, and before joining one too.
    ui.recording.hidden = !(s && s.recording);
    const muted = s ? conversationOf(s)?.muted.audio : false;
    ui.mute.textContent = muted ? "Unmute" : "Mute";
    ui.mute.setAttribute("aria-pressed", String(Boolean(muted)));
    ui.camera.textContent = mic.video ? "Camera off" : "Camera on";
    setVideo(ui.remoteVideo, s ? s.remoteVideo : null);
    setVideo(ui.localVideo, s && mic.video ? s.localVideo : null);
    ui.remoteVideo.dataset.live = s && s.remoteVideo && s.videoLive ? "1" : "";
    ui.area.hidden = !((s && s.remoteVideo && s.videoLive) || mic.video);
    ui.localVideo.hidden = !mic.video;
    const pending = s ? s.pending : null;
    ui.prompt.hidden = !pending;
    if (pending) {
      ui.promptText.textContent = pending.media === "video"
        ? `${pending.from.name} would like to turn on video.`
        : `${pending.from.name} would like to start a voice call.`;
      ui.accept.textContent = pending.media === "video" ? "Turn on my camera" : "Accept call";
    }
  }

  function update() { refresh(); changed(); }

  async function start(conversation, media) {
    try {
      await conversation.startVoice();
      if (media === "video") await conversation.startVideo();
    } catch (err) {
      notify(`Could not use your ${media === "video" ? "camera" : "microphone"}: ${err.message}`);
    }
    update();
  }

  // My click: turn on my side, and ask the others to add `media` unless they all send it
  // already (then this joins their call, and nobody is asked twice for the same medium).
  // A bot is always asked: it answers by itself.
  async function request(media) {
    const conversation = client.current;
    if (!conversation) return;
    await start(conversation, media);
    if (!(media === "audio" ? conversation.local.audio : conversation.local.video)) return;
    const s = call(conversation.id);
    const asked = counterparts(s);
    const already = asked.length > 0 && asked.every((p) => p.role !== "bot" && sends(s, p, media));
    if (!already) conversation.upgrade(media);
  }

  function answer(accept) {
    const conversation = client.current;
    const s = conversation && calls.get(conversation.id);
    if (!s || !s.pending) return;
    const { id, media } = s.pending;
    s.pending = null;
    conversation.replyUpgrade(id, accept);
    update();
    if (accept) start(conversation, media);
  }

  ui.call.addEventListener("click", () => request("audio"));
  ui.join.addEventListener("click", () => request("audio"));
  ui.video.addEventListener("click", () => request("video"));
  ui.mute.addEventListener("click", () => { client.mute("audio", !client.muted.audio); refresh(); });
  ui.camera.addEventListener("click", async () => {
    const conversation = client.current;
    if (!conversation) return;
    if (conversation.local.video) conversation.stopVideo(); else await start(conversation, "video");
    refresh();
  });
  ui.hangup.addEventListener("click", () => client.hangUp());
  ui.accept.addEventListener("click", () => answer(true));
  ui.decline.addEventListener("click", () => answer(false));

  client.on("joined", (msg) => {
    me = msg.identity;
    myRole = msg.role;
    if (msg.conversation == null) { refresh(); return; }
    const s = call(msg.conversation);
    s.others.clear();
    for (const p of msg.participants) if (p.identity !== me) s.others.set(p.identity, p);
    s.sending.clear();
    for (const m of msg.media || []) if (m.identity !== me) s.sending.set(m.identity, { audio: m.audio, video: m.video });
    s.recording = Boolean(msg.recording);
    update();
  });
  client.on("recording", (msg) => { call(msg.conversation).recording = Boolean(msg.active); refresh(); });
  client.on("participant.joined", (p) => { call(p.conversation).others.set(p.identity, p); refresh(); });
  client.on("participant.left", (p) => {
    const s = call(p.conversation);
    s.others.delete(p.identity);
    s.sending.delete(p.identity);
    if (s.ended && s.ended.identity === p.identity) s.ended.how = "left"; // the gateway ends a leaver's call first
    refresh();
  });
  // The gateway ended my call with the conversation (talkgate.js has closed it here).
  client.on("left", (msg) => {
    const s = calls.get(msg.conversation);
    if (s) { s.sinks.remove(); calls.delete(msg.conversation); }
    update();
  });
  client.on("status", refresh);
  client.on("select", refresh);

  client.on("upgrade.request", (msg) => {
    const s = call(msg.conversation);
    if (msg.from.identity === me) { s.mine.set(msg.id, msg.media); return; }
    const conversation = client.conversation(msg.conversation);
    const already = msg.media === "video" ? local(s).video : local(s).audio;
    if (already) { conversation?.replyUpgrade(msg.id, true); return; } // nothing to turn on
    s.pending = msg;
    update();
  });

  client.on("upgrade.reply", (msg) => {
    const s = calls.get(msg.conversation);
    const media = s && s.mine.get(msg.id);
    if (!media) return;
    s.mine.delete(msg.id);
    if (!msg.accept) {
      notify(`${msg.from.name} declined ${media === "video" ? "video" : "the call"}.`);
      const conversation = conversationOf(s);
      if (media === "video") conversation?.stopVideo(); else conversation?.hangUp();
      refresh();
    }
  });

  client.on("track", ({ track, kind, conversation }) => {
    const s = call(conversation);
    if (kind === "audio") {
      const audio = el("audio", { autoplay: true });
      audio.srcObject = new MediaStream([track]);
      s.sinks.append(audio);
      track.addEventListener("ended", () => audio.remove());
    } else {
      const stream = new MediaStream([track]);
      s.remoteVideo = stream;
      const live = (on) => { if (s.remoteVideo === stream) s.videoLive = on; refresh(); };
      track.addEventListener("unmute", () => live(true));
      track.addEventListener("mute", () => live(false));
      track.addEventListener("ended", () => live(false));
      live(!track.muted);
    }
  });

  client.on("localtrack", ({ kind, track, conversation }) => {
    if (kind === "video") call(conversation).localVideo = track ? new MediaStream([track]) : null;
    update();
  });

  client.on("call", ({ state, conversation }) => {
    const s = call(conversation);
    s.state = state;
    if (state === "idle") {
      s.sinks.replaceChildren();
      s.remoteVideo = null;
      s.videoLive = false;
      s.localVideo = null;
    }
    update();
  });

  client.on("media", (msg) => {
    if (msg.identity === me) return;
    const s = call(msg.conversation);
    if (msg.audio || msg.video) s.sending.set(msg.identity, { audio: msg.audio, video: msg.video });
    else s.sending.delete(msg.identity);
    if (!msg.video) s.videoLive = false;
    update();
  });

  refresh();
  return {
    // The upgrade request waiting for my answer in a conversation, or null.
    pending: (conversation) => calls.get(conversation)?.pending || null,
  };
}
