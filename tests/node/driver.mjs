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
import { createInterface } from "node:readline";
import { AbstractChat, DefaultChatTransport } from "ai";

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

async function run(cmd) {
  if (cmd.op === "stop") {
    const r = await fetch(`${api}/${encodeURIComponent(cmd.chat)}/stop`, { method: "POST", headers });
    return { status: r.status };
  }
  const finished = [];
  const chat = chatFor(cmd, finished);
  if (cmd.op === "send") await chat.sendMessage({ text: cmd.text });
  else if (cmd.op === "resume") await chat.resumeStream();
  else throw new Error(`unknown op ${cmd.op}`);
  return {
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
