#!/usr/bin/env node
// Example Node.js client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
// Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
//
//   node client.js [--target localhost:50051] [--language English] [--token TOKEN] speech.wav
//
// Exit status: 0 on success, 1 for a usage or file error, 2 when a call fails (one line on stderr names the
// gRPC status code and the server's message).
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');
const HEALTH_PROTO = '/usr/share/grpc-proto/grpc/health/v1/health.proto';
const LOAD_OPTIONS = { longs: Number, enums: String, defaults: false, oneofs: true };
const USAGE = 'usage: node client.js [--target host:port] [--language L] [--token TOKEN] FILE.wav';

// A usage, file or WAV error: exit status 1.
class UsageError extends Error {}

// A failed call: exit status 2, reported as "CALL failed: CODE: server's message".
class RpcError extends Error {
  constructor(call, err) {
    super(`${call} failed: ${grpc.status[err.code] || `CODE_${err.code}`}: ${err.details}`);
  }
}

// The last 14 bytes of the KSDATAFORMAT_SUBTYPE_* GUIDs; the first two are the format tag (1: PCM).
const SUBTYPE_GUID_TAIL = Buffer.from([0, 0, 0, 0, 0x10, 0, 0x80, 0, 0, 0xaa, 0, 0x38, 0x9b, 0x71]);

// gRPC's own retry policy (gRFC A6), the same in every client of this repository: a call that fails UNAVAILABLE
// (a server restarting, a connection refused) or RESOURCE_EXHAUSTED (a full queue) is sent again, at most 4
// attempts in all, after jittered exponential backoff from 0.2 s (at most 2 s). The server's
// "grpc-retry-pushback-ms" trailer overrides the backoff (its RetryInfo delay) or stops the retries (-1: audio over
// a limit, which no retry cures). A call is retried only until its first response header arrives, and a client
// stream only while gRPC still holds what was sent (its retry buffer). StreamingRecognize is left out: live audio
// is not replayed.
// grpc-js retries by default (since 1.8) once a policy is configured.
const RETRY_SERVICE_CONFIG = {
  methodConfig: [{
    name: ['Transcribe', 'TranscribeStream', 'Align', 'GetServerInfo']
      .map((method) => ({ service: 'qwenasr.v1.AsrService', method }))
      .concat([{ service: 'grpc.health.v1.Health', method: 'Check' }]),
    retryPolicy: {
      maxAttempts: 4,
      initialBackoff: '0.2s',
      maxBackoff: '2s',
      backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE', 'RESOURCE_EXHAUSTED'],
    },
  }],
};

// The 16-bit PCM samples of a WAV file, with its sample rate and channel count. Every length is checked against
// the file's, so a short or malformed file is a UsageError. A data chunk that claims more bytes than the file has
// (as streamed recordings do) is read to the end of the file.
function wavPcm(data) {
  if (data.length < 12 || data.toString('latin1', 0, 4) !== 'RIFF' || data.toString('latin1', 8, 12) !== 'WAVE') {
    throw new UsageError('not a RIFF/WAVE file');
  }
  let format = null;
  for (let pos = 12; pos + 8 <= data.length;) {
    const id = data.toString('latin1', pos, pos + 4);
    const size = data.readUInt32LE(pos + 4);
    const start = pos + 8;
    const end = start + size;
    if (id === 'fmt ') {
      if (end > data.length) throw new UsageError(`the fmt chunk (${size} bytes) runs past the end of the file`);
      if (size < 16) throw new UsageError(`the fmt chunk is ${size} bytes, under 16`);
      const body = data.subarray(start, end);
      let tag = body.readUInt16LE(0);
      const bits = body.readUInt16LE(14);
      format = { channels: body.readUInt16LE(2), rate: body.readUInt32LE(4) };
      if (tag === 0xfffe) { // WAVE_FORMAT_EXTENSIBLE: the real format is the sub-format GUID's first two bytes
        if (size < 40) throw new UsageError(`the WAVE_FORMAT_EXTENSIBLE fmt chunk is ${size} bytes, under 40`);
        tag = body.subarray(26, 40).equals(SUBTYPE_GUID_TAIL) ? body.readUInt16LE(24) : 0;
      }
      if (tag !== 1 || bits !== 16) {
        throw new UsageError(`only 16-bit PCM WAV is supported (format 0x${tag.toString(16)}, ${bits} bits)`);
      }
      if (format.channels === 0 || format.rate === 0) {
        throw new UsageError(`the fmt chunk says ${format.channels} channels at ${format.rate} Hz`);
      }
    } else if (id === 'data') {
      if (!format) throw new UsageError('the data chunk comes before the fmt chunk');
      let length = Math.min(end, data.length) - start;
      length -= length % (format.channels * 2);
      return { pcm: data.subarray(start, start + length), ...format };
    }
    pos = end + (size % 2);
  }
  throw new UsageError(format ? 'no data chunk' : 'no fmt chunk');
}

function parseArgs(argv) {
  const args = { target: 'localhost:50051', language: '', token: process.env.ASR_TOKEN || '', file: null };
  const options = { '--target': 'target', '--language': 'language', '--token': 'token' };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg in options) {
      if (i + 1 === argv.length) throw new UsageError(`${arg} needs a value; ${USAGE}`);
      args[options[arg]] = argv[++i];
    } else if (arg === '-h' || arg === '--help') {
      return null;
    } else if (arg.startsWith('-') || args.file !== null) {
      throw new UsageError(`unexpected argument ${arg}; ${USAGE}`);
    } else {
      args.file = arg;
    }
  }
  if (args.file === null) throw new UsageError(USAGE);
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args === null) {
    console.log(USAGE);
    return;
  }
  let wav;
  try {
    wav = fs.readFileSync(args.file);
  } catch (err) {
    throw new UsageError(`cannot read ${args.file}: ${err.message}`);
  }
  let pcm, rate, channels;
  try {
    ({ pcm, rate, channels } = wavPcm(wav));
  } catch (err) {
    throw new UsageError(`${args.file}: not a usable WAV file: ${err.message}`);
  }

  const asrDef = protoLoader.loadSync('qwenasr/v1/asr.proto', { ...LOAD_OPTIONS, includeDirs: [PROTO_DIR] });
  const healthDef = protoLoader.loadSync(HEALTH_PROTO, LOAD_OPTIONS);
  const { AsrService } = grpc.loadPackageDefinition(asrDef).qwenasr.v1;
  const { Health } = grpc.loadPackageDefinition(healthDef).grpc.health.v1;
  const credentials = grpc.credentials.createInsecure();
  const options = { 'grpc.service_config': JSON.stringify(RETRY_SERVICE_CONFIG) };
  const client = new AsrService(args.target, credentials, options);
  const health = new Health(args.target, credentials, options);
  try {
    // "authorization: Bearer TOKEN" on every call, when there is a token.
    const metadata = () => {
      const md = new grpc.Metadata();
      if (args.token) md.set('authorization', `Bearer ${args.token}`);
      return md;
    };
    const deadline = () => ({ deadline: Date.now() + 60_000 });
    const unaryCall = (stub, method, name, request) =>
      new Promise((resolve, reject) =>
        stub[method](request, metadata(), deadline(), (err, response) =>
          (err ? reject(new RpcError(name, err)) : resolve(response))));

    const status = await unaryCall(health, 'Check', 'health check', { service: '' });

    // Unary: the whole file in one message; the server reads the format from the WAV header.
    const request = { config: { language: args.language }, audio: wav };
    const unary = await unaryCall(client, 'Transcribe', 'Transcribe', request);

    // Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames. If the server ends the call early,
    // what is still written is dropped and the callback gets the server's status.
    const streamed = await new Promise((resolve, reject) => {
      const call = client.TranscribeStream(metadata(), deadline(), (err, response) =>
        (err ? reject(new RpcError('TranscribeStream', err)) : resolve(response)));
      call.on('error', () => {}); // the callback above reports it
      call.write({
        config: {
          language: args.language,
          audioFormat: { encoding: 'AUDIO_ENCODING_LINEAR16', sampleRateHz: rate, channelCount: channels },
        },
      });
      const frameBytes = Math.max(Math.floor(rate / 50), 1) * channels * 2;
      let ended = false;
      call.on('status', () => { ended = true; });
      // Back-pressure: when write() says the buffer is full, wait for 'drain', so an hour of audio is never queued
      // in memory at once.
      const send = async () => {
        for (let pos = 0; pos < pcm.length && !ended; pos += frameBytes) {
          if (!call.write({ audio: pcm.subarray(pos, pos + frameBytes) })) {
            await new Promise((resume) => {
              const done = () => {
                call.off('drain', done);
                call.off('status', done);
                resume();
              };
              call.on('drain', done);
              call.on('status', done);
            });
          }
        }
        if (!ended) call.end();
      };
      send().catch(reject);
    });

    console.log(JSON.stringify({ health: status.status, unary, stream: streamed }));
  } finally {
    client.close();
    health.close();
  }
}

main().catch((err) => {
  const code = err instanceof RpcError ? 2 : 1;
  const message = err instanceof UsageError || err instanceof RpcError ? err.message : `unexpected error: ${err}`;
  process.stderr.write(`asr-client-node: ${message.replace(/\n/g, ' ')}\n`);
  process.exitCode = code;
});
