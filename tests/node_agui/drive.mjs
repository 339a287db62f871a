// Drives the app's /api/ag-ui with the AG-UI protocol's own client (@ag-ui/client's HttpAgent).
// Called by tests/test_agui_client.py with one JSON argument:
//   {url, cookie, threadId, history?: Message[], texts: string[], abortAfterContent?: bool}
// Each text is sent as a run on the same agent (so later runs carry the client's history).
// Prints one JSON line per event as it arrives, then {"done": ...} with the agent's messages.
import { HttpAgent } from "@ag-ui/client";
import { randomUUID } from "node:crypto";

const config = JSON.parse(process.argv[2]);
const print = (value) => process.stdout.write(JSON.stringify(value) + "\n");

const agent = new HttpAgent({
  url: config.url,
  headers: { Cookie: config.cookie },
  threadId: config.threadId,
  initialMessages: config.history ?? [],
});

const failures = [];
for (const text of config.texts) {
  agent.addMessage({ id: randomUUID(), role: "user", content: text });
  let aborted = false;
  try {
    await agent.runAgent(
      {},
      {
        onEvent({ event }) {
          print({ event });
          if (config.abortAfterContent && event.type === "TEXT_MESSAGE_CONTENT" && !aborted) {
            aborted = true;
            agent.abortRun();
          }
        },
        onRunFailed({ error }) {
          failures.push(String(error?.message ?? error));
        },
      },
    );
  } catch (error) {
    failures.push(String(error?.message ?? error));
  }
  print({ runEnded: text, aborted });
}
print({ done: true, failures, messages: agent.messages });
