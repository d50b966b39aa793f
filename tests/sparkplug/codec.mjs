// The independent Sparkplug B codec in the tests: Eclipse Tahu's JavaScript one (sparkplug-payload).
// Reads JSON lines on stdin and answers one JSON line each:
//   {"decode": "<base64 payload>"}  -> the decoded payload (64-bit integers as numbers)
//   {"encode": {...payload...}}      -> {"b64": "<base64 payload>"}
import { createInterface } from "node:readline";
import sparkplug from "sparkplug-payload";

const codec = sparkplug.get("spBv1.0");

function plain(value) {
  if (value === null || value === undefined) return value;
  if (typeof value === "bigint") return Number(value);
  if (typeof value === "object" && typeof value.toNumber === "function" && "low" in value) return value.toNumber();
  if (value instanceof Uint8Array) return Buffer.from(value).toString("base64");
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const request = JSON.parse(line);
    if (request.decode !== undefined) {
      answer = plain(codec.decodePayload(Buffer.from(request.decode, "base64")));
    } else {
      answer = { b64: Buffer.from(codec.encodePayload(request.encode)).toString("base64") };
    }
  } catch (err) {
    answer = { error: String(err) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
