#!/usr/bin/env node
// Example Node.js client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
// Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
//
//   node client.js [--target localhost:50051] [--language English] speech.wav
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');
const HEALTH_PROTO = '/usr/share/grpc-proto/grpc/health/v1/health.proto';
const LOAD_OPTIONS = { longs: Number, enums: String, defaults: false, oneofs: true };

// The 16-bit PCM samples of a WAV file, with its sample rate and channel count.
function wavPcm(data) {
  if (data.toString('ascii', 0, 4) !== 'RIFF' || data.toString('ascii', 8, 12) !== 'WAVE') {
    throw new Error('not a RIFF/WAVE file');
  }
  let format = null;
  for (let pos = 12; pos + 8 <= data.length;) {
    const id = data.toString('ascii', pos, pos + 4);
    const size = data.readUInt32LE(pos + 4);
    const body = data.subarray(pos + 8, pos + 8 + size);
    if (id === 'fmt ') {
      if (body.readUInt16LE(0) !== 1 || body.readUInt16LE(14) !== 16) throw new Error('only 16-bit PCM WAV');
      format = { channels: body.readUInt16LE(2), rate: body.readUInt32LE(4) };
    } else if (id === 'data' && format) {
      return { pcm: body, ...format };
    }
    pos += 8 + size + (size % 2);
  }
  throw new Error('no fmt or data chunk');
}

function parseArgs(argv) {
  const args = { target: 'localhost:50051', language: '', file: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--target') args.target = argv[++i];
    else if (argv[i] === '--language') args.language = argv[++i];
    else args.file = argv[i];
  }
  if (!args.file) throw new Error('usage: node client.js [--target host:port] [--language L] FILE.wav');
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const asrDef = protoLoader.loadSync('qwenasr/v1/asr.proto', { ...LOAD_OPTIONS, includeDirs: [PROTO_DIR] });
  const healthDef = protoLoader.loadSync(HEALTH_PROTO, LOAD_OPTIONS);
  const { AsrService } = grpc.loadPackageDefinition(asrDef).qwenasr.v1;
  const { Health } = grpc.loadPackageDefinition(healthDef).grpc.health.v1;
  const credentials = grpc.credentials.createInsecure();
  const client = new AsrService(args.target, credentials);
  const health = new Health(args.target, credentials);
  const deadline = () => ({ deadline: Date.now() + 60_000 });
  const unaryCall = (stub, method, request) =>
    new Promise((resolve, reject) =>
      stub[method](request, deadline(), (err, response) => (err ? reject(err) : resolve(response))));

  const wav = fs.readFileSync(args.file);
  const { pcm, rate, channels } = wavPcm(wav);

  const status = await unaryCall(health, 'Check', { service: '' });

  // Unary: the whole file in one message; the server reads the format from the WAV header.
  const unary = await unaryCall(client, 'Transcribe', { config: { language: args.language }, audio: wav });

  // Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames.
  const streamed = await new Promise((resolve, reject) => {
    const call = client.TranscribeStream(deadline(), (err, response) => (err ? reject(err) : resolve(response)));
    call.write({
      config: {
        language: args.language,
        audioFormat: { encoding: 'AUDIO_ENCODING_LINEAR16', sampleRateHz: rate, channelCount: channels },
      },
    });
    const frameBytes = (rate / 50) * channels * 2;
    for (let pos = 0; pos < pcm.length; pos += frameBytes) {
      call.write({ audio: pcm.subarray(pos, pos + frameBytes) });
    }
    call.end();
  });

  console.log(JSON.stringify({ health: status.status, unary, stream: streamed }));
  client.close();
  health.close();
}

main().catch((err) => {
  console.error(`asr-client-node: ${err.message}`);
  process.exit(1);
});
