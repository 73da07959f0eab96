#!/usr/bin/env node
// A federated-learning trainer in Node.js: it talks only to its fl-sidecar, over gRPC.
//
// It follows the sidecar's events (WatchEvents) and, for each one:
//   UPDATE_ROUND_START  download the global model as SAFETENSORS, "train" it
//                       (every float32 weight becomes w * scale + shift: enough
//                       to show the bytes round-trip and the FL server
//                       aggregates them), upload it as SAFETENSORS with its
//                       sample size and a metric;
//   MODEL_TEST_ROUND    upload test metrics of the new global model;
//   TRAINING_FINISHED   exit 0.
// The safetensors format is parsed here by hand: an 8-byte little-endian
// header length, a JSON header of {name: {dtype, shape, data_offsets}}, then
// the raw little-endian tensor bytes.
//
// Usage:
//   node trainer.js --target unix:///run/user/1000/fl-sidecar/sidecar.sock \
//       [--training-id ID] [--scale 1.0] [--shift 0.01] [--sample-size 100] \
//       [--event-timeout 60] [--api-token TOKEN]
// Prints one JSON object per line on stdout (ready, train, test, finished, error).
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = path.join(PROTO_ROOT, 'fl_sidecar', 'v1', 'sidecar.proto');
const CHUNK_SIZE = 1024 * 1024; // bytes per upload message (the contract allows 1-4 MiB)
const MAX_MESSAGE_SIZE = 8 * 1024 * 1024; // the sidecar's limit, both directions

function parseArgs(argv) {
  const options = {
    target: process.env.FL_SIDECAR_TARGET || '',
    trainingId: '',
    scale: 1.0,
    shift: 0.01,
    sampleSize: 100,
    eventTimeout: 60,
    apiToken: '',
  };
  const names = {
    '--target': ['target', String],
    '--training-id': ['trainingId', String],
    '--scale': ['scale', Number],
    '--shift': ['shift', Number],
    '--sample-size': ['sampleSize', Number],
    '--event-timeout': ['eventTimeout', Number],
    '--api-token': ['apiToken', String],
  };
  for (let i = 0; i < argv.length; i += 2) {
    const spec = names[argv[i]];
    if (!spec || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${argv[i]}`);
    }
    const value = spec[1](argv[i + 1]);
    if (typeof value === 'number' && !Number.isFinite(value)) {
      throw new Error(`${argv[i]} needs a number`);
    }
    options[spec[0]] = value;
  }
  if (!options.target) {
    throw new Error('--target (or FL_SIDECAR_TARGET) is required, e.g. unix:///path/sidecar.sock');
  }
  if (options.target.startsWith('/')) {
    options.target = 'unix:' + options.target;
  }
  return options;
}

function emit(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

function loadSidecarService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (model_id, sample_size, ...)
    longs: Number, // uint64 byte counts fit in a double for any real model
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).fl_sidecar.v1.Sidecar;
}

// --- safetensors -------------------------------------------------------------

function parseSafetensors(buffer) {
  if (buffer.length < 8) throw new Error('safetensors: shorter than its header length');
  const headerLength = Number(buffer.readBigUInt64LE(0));
  if (8 + headerLength > buffer.length) throw new Error('safetensors: header runs past the end');
  const header = JSON.parse(buffer.subarray(8, 8 + headerLength).toString('utf8'));
  const dataStart = 8 + headerLength;
  const tensors = [];
  for (const [name, spec] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [begin, end] = spec.data_offsets;
    if (begin > end || dataStart + end > buffer.length) {
      throw new Error(`safetensors: tensor ${name} lies outside the data`);
    }
    tensors.push({ name, dtype: spec.dtype, shape: spec.shape, begin: dataStart + begin, end: dataStart + end });
  }
  return tensors;
}

// Calls visit(offset) for every F32 value of a safetensors buffer; returns how many.
function forEachFloat32(buffer, visit) {
  let count = 0;
  for (const tensor of parseSafetensors(buffer)) {
    if (tensor.dtype !== 'F32') continue;
    for (let offset = tensor.begin; offset + 4 <= tensor.end; offset += 4) {
      visit(offset);
      count += 1;
    }
  }
  return count;
}

// Returns a new buffer with every F32 value v replaced by v * scale + shift.
function transformFloat32(buffer, scale, shift) {
  const out = Buffer.from(buffer); // a copy: same header, same layout
  const changed = forEachFloat32(out, (offset) =>
    out.writeFloatLE(out.readFloatLE(offset) * scale + shift, offset),
  );
  return { data: out, changed };
}

// --- gRPC calls as promises ----------------------------------------------------

function callOptions(options) {
  const metadata = new grpc.Metadata();
  if (options.apiToken) metadata.set('x-fl-sidecar-token', options.apiToken);
  return metadata;
}

function download(client, options, modelId) {
  return new Promise((resolve, reject) => {
    const stream = client.DownloadModel(
      { model_id: modelId, format: 'MODEL_FORMAT_SAFETENSORS' },
      callOptions(options),
    );
    const chunks = [];
    let info = null;
    stream.on('data', (message) => {
      if (message.kind === 'info') info = message.info;
      else if (message.kind === 'chunk') chunks.push(message.chunk);
    });
    stream.on('error', reject);
    stream.on('end', () => {
      if (!info) return reject(new Error('download: no model info'));
      const data = Buffer.concat(chunks);
      if (data.length !== info.size) return reject(new Error(`download: ${data.length} of ${info.size} bytes`));
      const digest = crypto.createHash('sha256').update(data).digest('hex');
      if (info.sha256 && info.sha256 !== digest) return reject(new Error('download: sha256 mismatch'));
      resolve({ data, info });
    });
  });
}

function upload(client, options, header, data) {
  return new Promise((resolve, reject) => {
    const call = client.UploadModel(callOptions(options), (error, response) =>
      error ? reject(error) : resolve(response),
    );
    call.write({
      header: {
        ...header,
        format: 'MODEL_FORMAT_SAFETENSORS',
        size: data.length,
        sha256: crypto.createHash('sha256').update(data).digest('hex'),
      },
    });
    for (let offset = 0; offset < data.length; offset += CHUNK_SIZE) {
      call.write({ chunk: data.subarray(offset, offset + CHUNK_SIZE) });
    }
    call.end();
  });
}

function uploadMetrics(client, options, modelId, metrics) {
  return new Promise((resolve, reject) => {
    client.UploadMetrics({ model_id: modelId, metrics }, callOptions(options), (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// --- the trainer -----------------------------------------------------------------

function meanAbs(buffer) {
  let total = 0;
  const count = forEachFloat32(buffer, (offset) => {
    total += Math.abs(buffer.readFloatLE(offset));
  });
  return count ? total / count : 0;
}

async function onRound(client, options, event) {
  const started = Date.now();
  const { data, info } = await download(client, options, event.model_id);
  const { data: trained, changed } = transformFloat32(data, options.scale, options.shift);
  const response = await upload(
    client,
    options,
    {
      model_id: event.model_id,
      round: event.round || 0,
      sample_size: options.sampleSize,
      metrics: [{ name: 'accuracy', value: 0.5 }],
    },
    trained,
  );
  emit({
    event: 'train',
    round: event.round || 0,
    down_raw: info.size,
    down_wire: info.wire_bytes,
    up_raw: response.raw_bytes,
    up_wire: response.wire_bytes,
    http_status: response.http_status,
    values_changed: changed,
    seconds: (Date.now() - started) / 1000,
  });
}

async function onTest(client, options, event) {
  const { data } = await download(client, options, event.model_id);
  const metrics = [{ name: 'accuracy', value: 1 / (1 + meanAbs(data)) }];
  const response = await uploadMetrics(client, options, event.model_id, metrics);
  emit({ event: 'test', round: event.round || 0, http_status: response.http_status });
}

function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`trainer.js: ${error.message}\n`);
    process.exit(2);
  }
  const Sidecar = loadSidecarService();
  const client = new Sidecar(options.target, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': MAX_MESSAGE_SIZE,
    'grpc.max_send_message_length': MAX_MESSAGE_SIZE,
  });
  const request = options.trainingId ? { training_ids: [options.trainingId] } : {};
  const stream = client.WatchEvents(request, callOptions(options));
  let timer = null;
  let busy = Promise.resolve();
  const fail = (error) => {
    emit({ event: 'error', error: String(error && error.details ? error.details : error) });
    process.exit(1);
  };
  const armTimer = () => {
    clearTimeout(timer);
    timer = setTimeout(() => fail(new Error('stalled: no event in time')), options.eventTimeout * 1000);
  };
  // The sidecar replays events no subscriber has received yet, so nothing
  // is missed between this call and the subscription taking effect.
  client.GetInfo({}, callOptions(options), (error, info) => {
    if (error) fail(error);
    else emit({ event: 'ready', sidecar_version: info.version });
  });
  stream.on('data', (event) => {
    armTimer();
    // Events are handled one at a time, in order.
    busy = busy.then(async () => {
      if (event.kind === 'EVENT_KIND_UPDATE_ROUND_START') {
        await onRound(client, options, event);
      } else if (event.kind === 'EVENT_KIND_MODEL_TEST_ROUND') {
        await onTest(client, options, event);
      } else if (event.kind === 'EVENT_KIND_TRAINING_FINISHED') {
        emit({ event: 'finished', seq: event.seq });
        clearTimeout(timer);
        stream.cancel();
        client.close();
        process.exit(0);
      }
    }).catch(fail);
  });
  stream.on('error', (error) => {
    if (error.code !== grpc.status.CANCELLED) fail(error);
  });
  armTimer();
}

main();
