// The official TypeScript SDK as a client of tollgate, one scenario per run.
//
// Usage: node scenarios.mjs SCENARIO
//
// The SDK reads ANTHROPIC_BASE_URL (tollgate) and ANTHROPIC_API_KEY from the
// environment, as an application would. The mock upstream behind tollgate is
// steered with its `x-mock-*` request headers, sent as per-request `headers`.
// Prints exactly one JSON line on stdout describing what the SDK saw; the same
// protocol as tests/sdk/python/scenarios.py, read by tests/sdk_clients.rs.
//
// Scenarios ending in `_v0` use @anthropic-ai/sdk 0.137.0 (installed under the
// alias `anthropic-sdk-v0`), the last release that authenticates with
// `x-api-key` and `anthropic-version: 2023-06-01`; 1.x sends
// `Authorization: Bearer` with `2026-10-21`.

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';

import Anthropic from '@anthropic-ai/sdk';
import AnthropicV0 from 'anthropic-sdk-v0';

// The packages do not export their package.json, so it is read from disk.
const installedVersion = (dir) =>
  JSON.parse(readFileSync(new URL(`./node_modules/${dir}/package.json`, import.meta.url))).version;
const VERSIONS = {
  current: installedVersion('@anthropic-ai/sdk'),
  v0: installedVersion('anthropic-sdk-v0'),
};

const MODEL = 'claude-sonnet-4-6';
const PROMPT = [{ role: 'user', content: 'Say something short.' }];
const REPORTED_HEADERS = ['tollgate-request-id', 'request-id', 'x-mock-usage', 'retry-after'];

function headersOf(headers) {
  const out = {};
  for (const name of REPORTED_HEADERS) {
    const value = headers?.get(name);
    if (value != null) out[name] = value;
  }
  return out;
}

// A client whose `fetch` notes how each attempt authenticated (never the key
// itself) and which API version it asked for.
function recordingClient(Sdk, options = {}) {
  const attempts = [];
  const fetchAndRecord = (url, init) => {
    const headers = new Headers(init?.headers);
    const authorization = headers.get('authorization');
    attempts.push({
      'anthropic-version': headers.get('anthropic-version') ?? '',
      ...(authorization != null && { 'authorization-scheme': authorization.split(' ')[0] }),
      'x-api-key-present': headers.has('x-api-key'),
    });
    return fetch(url, init);
  };
  return { client: new Sdk({ ...options, fetch: fetchAndRecord }), attempts };
}

function messageReport(message) {
  return {
    message_id: message.id,
    model: message.model,
    stop_reason: message.stop_reason,
    usage: message.usage,
    content: message.content.map((block) =>
      block.type === 'text'
        ? { type: 'text', text: block.text }
        : block.type === 'tool_use'
          ? { type: 'tool_use', name: block.name, input: block.input }
          : { type: block.type },
    ),
  };
}

function errorReport(err, Sdk) {
  const chain = [];
  for (let proto = Object.getPrototypeOf(err); proto && proto !== Object.prototype; proto = Object.getPrototypeOf(proto)) {
    chain.push(proto.constructor.name);
  }
  const report = {
    class: err?.constructor?.name ?? typeof err,
    mro: chain,
    message: String(err?.message ?? err).slice(0, 500),
    sdk_error: err instanceof Sdk.AnthropicError,
  };
  if (err instanceof Sdk.APIError) {
    report.status_code = err.status ?? null;
    report.type = err.type ?? null;
    report.request_id = err.requestID ?? null;
    report.headers = headersOf(err.headers);
  }
  return report;
}

async function streamWith(Sdk) {
  const { client, attempts } = recordingClient(Sdk);
  const stream = client.messages.stream(
    { model: MODEL, max_tokens: 64, messages: PROMPT },
    { headers: { 'x-mock-output-tokens': '11', 'x-mock-cache': 'write=4,read=17' } },
  );
  const texts = [];
  stream.on('text', (text) => texts.push(text));
  const final = await stream.finalMessage();
  const { response } = await stream.withResponse();
  return {
    ...messageReport(final),
    sdk_request_id: stream.request_id ?? null,
    text_stream: texts.join(''),
    text_events: texts.length,
    headers: headersOf(response.headers),
    sent: attempts[0],
  };
}

async function createWith(Sdk) {
  const { client, attempts } = recordingClient(Sdk);
  const { data, response, request_id } = await client.messages
    .create(
      { model: MODEL, max_tokens: 64, messages: PROMPT },
      { headers: { 'x-mock-output-tokens': '13', 'x-mock-cache': 'write=2,read=5' } },
    )
    .withResponse();
  return {
    ...messageReport(data),
    sdk_request_id: request_id ?? null,
    headers: headersOf(response.headers),
    sent: attempts[0],
  };
}

const SCENARIOS = {
  // `client.messages.stream(...)`: text events, then `finalMessage()`.
  stream: [Anthropic, () => streamWith(Anthropic)],
  // Non-streaming `messages.create(...)`.
  create: [Anthropic, () => createWith(Anthropic)],
  // The same two with the x-api-key SDK.
  stream_v0: [AnthropicV0, () => streamWith(AnthropicV0)],
  create_v0: [AnthropicV0, () => createWith(AnthropicV0)],
  // A 429 with `retry-after: 1` on the first attempt only; the SDK retries.
  retry_429: [
    Anthropic,
    async () => {
      const { client, attempts } = recordingClient(Anthropic);
      const started = performance.now();
      const { data, response } = await client.messages
        .create(
          { model: MODEL, max_tokens: 64, messages: PROMPT },
          {
            headers: {
              'x-mock-output-tokens': '6',
              'x-mock-fault': 'status=429;retry-after=1',
              'x-mock-fail-times': '1',
              'x-mock-fault-key': `ts-${randomUUID()}`,
            },
          },
        )
        .withResponse();
      return {
        ...messageReport(data),
        headers: headersOf(response.headers),
        attempts: attempts.length,
        max_retries: client.maxRetries,
        elapsed_s: (performance.now() - started) / 1000,
      };
    },
  ],
  // An in-stream `overloaded_error` event.
  stream_error: [
    Anthropic,
    async () => {
      const stream = new Anthropic().messages.stream(
        { model: MODEL, max_tokens: 64, messages: PROMPT },
        { headers: { 'x-mock-output-tokens': '20', 'x-mock-fault': 'error-after=3' } },
      );
      await stream.finalMessage();
      throw new ScenarioFailure('the stream ended without an error');
    },
  ],
};

class ScenarioFailure extends Error {}

async function main() {
  const name = process.argv[2];
  if (process.argv.length !== 3 || !(name in SCENARIOS)) {
    console.error(`usage: scenarios.mjs {${Object.keys(SCENARIOS).join('|')}}`);
    return 2;
  }
  const [Sdk, run] = SCENARIOS[name];
  const out = {
    scenario: name,
    sdk: 'anthropic-typescript',
    sdk_version: Sdk === AnthropicV0 ? VERSIONS.v0 : VERSIONS.current,
  };
  const started = performance.now();
  try {
    out.result = await run();
    out.outcome = 'ok';
  } catch (err) {
    if (err instanceof ScenarioFailure) throw err;
    // An exception is what an error scenario observes, not a crash.
    out.outcome = 'error';
    out.error = errorReport(err, Sdk);
  }
  out.elapsed_s = (performance.now() - started) / 1000;
  process.stdout.write(JSON.stringify(out) + '\n');
  return 0;
}

process.exitCode = await main();
