// Drives the app's /api/chat with the Vercel AI SDK's own client (AbstractChat and
// DefaultChatTransport from the `ai` package), for tests/test_api_client.py.
//
// Usage: node driver.mjs BASE_URL COOKIE
// Reads one JSON command per line on stdin; each runs at once (several may be in flight) and
// writes JSON lines to stdout tagged with the command's `tag`: progress ({tag, event: "text",
// text}) when the reply first shows text, then the result ({tag, done: true, ...}).
//   {"op": "send", "tag": "a", "chat": "id", "text": "Hi", "disconnectOnText": false}
//   {"op": "resume", "tag": "b", "chat": "id"}      (reconnectToStream: a reloaded page)
//   {"op": "stop", "tag": "c", "chat": "id"}        (POST /api/chat/{id}/stop)
//   {"op": "approve", "tag": "d", "chat": "id", "text": "Hi", "approved": true}
//       send; answer each tool approval the reply asks for with `addToolApprovalResponse`,
//       which sends the answers itself (`sendAutomaticallyWhen`); wait for that reply too.
import { createInterface } from "node:readline";
import {
  AbstractChat,
  DefaultChatTransport,
  isToolUIPart,
  lastAssistantMessageIsCompleteWithApprovalResponses,
} from "ai";

const [base, cookie] = process.argv.slice(2);
const api = `${base}/api/chat`;
const headers = { cookie };

function say(line) {
  process.stdout.write(JSON.stringify(line) + "\n");
}

// The state a UI framework would keep (React's useState, a Svelte store): plain arrays here.
class PlainState {
  constructor(onChange) {
    this.status = "ready";
    this.error = undefined;
    this.messages = [];
    this.onChange = onChange;
  }
  pushMessage(m) { this.messages = [...this.messages, m]; this.onChange(); }
  popMessage() { this.messages = this.messages.slice(0, -1); this.onChange(); }
  replaceMessage(i, m) { this.messages = this.messages.map((x, j) => (j === i ? m : x)); this.onChange(); }
  snapshot(thing) { return structuredClone(thing); }
}

class Chat extends AbstractChat {
  constructor({ onText, ...init }) {
    let state;
    const onChange = () => onText(replyText(state.messages));
    state = new PlainState(onChange);
    super({ ...init, state, transport: new DefaultChatTransport({ api, headers }) });
  }
}

function replyText(messages) {
  const last = messages.filter((m) => m.role === "assistant").at(-1);
  return last ? last.parts.filter((p) => p.type === "text").map((p) => p.text).join("") : "";
}

function chatFor(cmd, finished) {
  let announced = false;
  let chat;
  chat = new Chat({
    id: cmd.chat,
    // As an app with approval buttons sets it: the answers go back once every call has one.
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
    onText: (text) => {
      if (text && !announced) {
        announced = true;
        say({ tag: cmd.tag, event: "text", text });
        if (cmd.disconnectOnText) chat.stop(); // the tab goes away: the client hangs up
      }
    },
    onFinish: (f) => finished.push({ isAbort: f.isAbort, isError: f.isError, isDisconnect: f.isDisconnect }),
    onError: (e) => finished.push({ error: String(e && e.message) }),
  });
  return chat;
}

function toolParts(chat) {
  const last = chat.messages.filter((m) => m.role === "assistant").at(-1);
  return (last ? last.parts.filter(isToolUIPart) : []).map((p) => ({
    type: p.type,
    toolCallId: p.toolCallId,
    state: p.state,
    input: p.input,
    approval: p.approval ?? null,
  }));
}

async function until(check, ms = 20000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error("timed out waiting for the reply after the approval");
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function approve(cmd, chat, finished) {
  await chat.sendMessage({ text: cmd.text });
  const asked = toolParts(chat).filter((p) => p.state === "approval-requested");
  const pausedText = replyText(chat.messages);
  for (const p of asked) {
    await chat.addToolApprovalResponse({ id: p.approval.id, approved: cmd.approved, reason: cmd.reason });
  }
  // The SDK sends the answers on its own, without a promise to wait on: wait for its end.
  if (asked.length) await until(() => finished.length >= 2 && chat.status !== "submitted" && chat.status !== "streaming");
  return { asked, pausedText, tools: toolParts(chat) };
}

async function run(cmd) {
  if (cmd.op === "stop") {
    const r = await fetch(`${api}/${encodeURIComponent(cmd.chat)}/stop`, { method: "POST", headers });
    return { status: r.status };
  }
  const finished = [];
  const chat = chatFor(cmd, finished);
  let extra = {};
  if (cmd.op === "send") await chat.sendMessage({ text: cmd.text });
  else if (cmd.op === "resume") await chat.resumeStream();
  else if (cmd.op === "approve") extra = await approve(cmd, chat, finished);
  else throw new Error(`unknown op ${cmd.op}`);
  return {
    ...extra,
    status: chat.status,
    error: chat.error ? String(chat.error.message) : null,
    text: replyText(chat.messages),
    roles: chat.messages.map((m) => m.role),
    finished,
  };
}

const lines = createInterface({ input: process.stdin });
const pending = [];
lines.on("line", (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  pending.push(
    run(cmd).then(
      (result) => say({ tag: cmd.tag, done: true, ...result }),
      (err) => say({ tag: cmd.tag, done: true, failed: String(err && err.stack) }),
    ),
  );
});
lines.on("close", async () => {
  await Promise.all(pending);
});
