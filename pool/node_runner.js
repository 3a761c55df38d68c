// The JavaScript child of the runner: node, started and warmed before the sandbox is ready.
//
// pool/runner.py forks, sets the child up as for Python (parent-death signal,
// oom_score_adj, fds 1 and 2 on the output pipes) and execs
//
//     node /opt/sandpool/node_runner.js <request fd> <status fd> <ready fd>
//
// with fd 0 an empty memfd: node cannot dup2, so the runner, not node, makes
// fd 0 the code's stdin, and this program writes the request's stdin into it
// (``fs.readFileSync(0)``, ``/dev/stdin`` and ``process.stdin`` all read it).
// This program loads what a request needs, writes one byte on the ready fd
// (the runner reports ready only after it) and blocks reading its one request
// (pool/wire.py's GuestRequest: a JSON header, then the files' bytes) from the request fd.
//
// A run: the request's files are written and out/ made (as pool/runcode.py's
// ``prepare``), env and argv applied (``process.argv.slice(2)`` is argv), and
// the code runs as a CommonJS module of the working directory. Code that only
// an ES module may hold (``import``, top-level ``await``, ``export``,
// ``import.meta``) is run instead as a .mjs file written beside it. When the
// event loop is empty, ``process.exit(n)`` is called, or an exception or a
// rejection goes uncaught, the code's 'exit' listeners run as under plain
// node, then the outcome goes on the status fd as the Python child sends it:
// the uncaught error (ERROR), every entry of out/ (FILE_OUT, CONTENT), EXIT.
// Then this process parks: like the Python child, its exit teardown stays off
// the request's path, and nothing the code left scheduled runs after EXIT.
//
// pool/guest.py composes this file into the installed one, replacing the
// WIRE_CONSTANTS marker below with pool/wire.py's values: frame kinds, sizes
// and limits are defined there only.

'use strict';

// @@WIRE_CONSTANTS@@

const fs = require('fs');
const util = require('util');
const vm = require('vm');
const { createRequire, Module } = require('module');
const { pathToFileURL } = require('url');

// Loaded before ready, so a request that needs them does not pay for the load.
const WARM_MODULES = [
  'assert', 'buffer', 'child_process', 'crypto', 'events', 'os', 'readline', 'stream',
  'string_decoder', 'timers', 'zlib',
];

// What V8 says of code only an ES module may hold, compiled as CommonJS.
const MODULE_ONLY_SYNTAX = [
  'Cannot use import statement outside a module',
  'await is only valid in async functions and the top level bodies of modules',
  "Cannot use 'import.meta' outside a module",
  "Unexpected token 'export'",
];

const MODULE_FILE = '.sandpool-main.mjs'; // an ES module's source, beside the code, while it loads
const UNSETTLED_TOP_LEVEL_AWAIT = 13; // node's own exit status for it

const SELF = __filename;
const { O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK, O_RDONLY, O_WRONLY } = fs.constants;
const PARK = new Int32Array(new SharedArrayBuffer(4));

function sleepMs(ms) {
  Atomics.wait(PARK, 0, 0, ms);
}

function park() {
  for (;;) Atomics.wait(PARK, 0, 0);
}

function writeAll(fd, data) {
  let offset = 0;
  while (offset < data.length) {
    try {
      offset += fs.writeSync(fd, data, offset, data.length - offset);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
      sleepMs(1); // libuv made a pipe the code also writes to non-blocking
    }
  }
}

function readExact(fd, size) {
  const buffer = Buffer.alloc(size);
  let offset = 0;
  while (offset < size) {
    let count;
    try {
      count = fs.readSync(fd, buffer, offset, size - offset, null);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
      sleepMs(1);
      continue;
    }
    if (count === 0) process.exit(0); // the daemon destroyed the sandbox before sending one
    offset += count;
  }
  return buffer;
}

// --- frames (pool/wire.py) -----------------------------------------------------

function frame(kind, payload) {
  const header = Buffer.alloc(WIRE.FRAME_BYTES);
  header.write(kind, 0, 'latin1');
  header.writeUInt32BE(payload.length, WIRE.FRAME_BYTES - 4);
  return Buffer.concat([header, payload]);
}

function headerFrame(kind, header) {
  return frame(kind, Buffer.from(JSON.stringify(header), 'utf8'));
}

function contentFrames(data) {
  const frames = [];
  for (let i = 0; i < data.length; i += WIRE.CHUNK) {
    frames.push(frame(WIRE.CONTENT, data.subarray(i, i + WIRE.CHUNK)));
  }
  return frames;
}

function exitFrame(status) {
  const payload = Buffer.alloc(WIRE.STATUS_BYTES);
  payload.writeInt32BE(status, 0);
  return frame(WIRE.EXIT, payload);
}

// --- the request ---------------------------------------------------------------

function takeRequest(fd) {
  const sizes = readExact(fd, WIRE.REQUEST_BYTES);
  const header = readExact(fd, sizes.readUInt32BE(0));
  return parseRequest(header, readExact(fd, sizes.readUInt32BE(4)));
}

// A request from its JSON header and the files' contents after it (pool/wire.py's
// GuestRequest). Throws on a malformed one.
function parseRequest(header, contents) {
  const request = JSON.parse(header.toString('utf8'));
  const strings = (list) => Array.isArray(list) && list.every((x) => typeof x === 'string');
  const { code, stdin = '', files = [], env = {}, argv = [], limits } = request;
  const sized = (f) => Array.isArray(f) && f.length === 2 && typeof f[0] === 'string' &&
    Number.isSafeInteger(f[1]) && f[1] >= 0;
  if (typeof code !== 'string' || typeof stdin !== 'string' || !strings(argv) ||
      !Array.isArray(files) || !files.every(sized) ||
      files.reduce((total, [, size]) => total + size, 0) !== contents.length ||
      typeof env !== 'object' || env === null || !strings(Object.values(env)) ||
      typeof limits !== 'object' || limits === null ||
      !WIRE.LIMITS.every((key) => Number.isSafeInteger(limits[key]) && limits[key] >= 0)) {
    throw new TypeError('malformed request');
  }
  let offset = 0;
  const contentsOf = ([path, size]) => [path, contents.subarray(offset, offset += size)];
  return { code, stdin, files: files.map(contentsOf), env, argv, limits };
}

// The request's files under the working directory, each created new and never
// through a link, and an empty out/ (pool/runcode.py's prepare). Throws.
function prepare(request) {
  const base = process.cwd();
  for (const [file, content] of request.files) {
    const parts = file.split('/');
    if (file.startsWith('/') || parts.some((part) => ['', '.', '..'].includes(part))) {
      throw new Error(`refused file path ${JSON.stringify(file)}`);
    }
    let directory = base;
    for (const part of parts.slice(0, -1)) {
      directory = `${directory}/${part}`;
      try {
        fs.mkdirSync(directory);
      } catch (e) {
        if (e.code !== 'EEXIST') throw e;
      }
    }
    const fd = fs.openSync(`${base}/${file}`, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644);
    try {
      writeAll(fd, content);
    } finally {
      fs.closeSync(fd);
    }
  }
  try {
    fs.mkdirSync(`${base}/${WIRE.OUT_DIR}`);
  } catch (e) {
    if (e.code !== 'EEXIST') throw e;
  }
  Object.assign(process.env, request.env);
  return base;
}

// --- out/ (pool/runcode.py's out_dir_frames) -------------------------------------

function kindOf(stats) {
  if (stats.isFile()) return 'file';
  if (stats.isSymbolicLink()) return 'symlink';
  if (stats.isFIFO()) return 'fifo';
  if (stats.isSocket()) return 'socket';
  if (stats.isCharacterDevice() || stats.isBlockDevice()) return 'device';
  return 'other';
}

// At most ``limit`` bytes; nothing for what cannot be opened as a regular file.
function readFileCapped(file, limit) {
  if (limit <= 0) return Buffer.alloc(0);
  let fd;
  try {
    fd = fs.openSync(file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch {
    return Buffer.alloc(0);
  }
  try {
    if (!fs.fstatSync(fd).isFile()) return Buffer.alloc(0);
    const parts = [];
    let left = limit;
    while (left > 0) {
      const chunk = Buffer.alloc(Math.min(left, 1 << 20));
      const count = fs.readSync(fd, chunk, 0, chunk.length, null);
      if (count === 0) break;
      parts.push(chunk.subarray(0, count));
      left -= count;
    }
    return Buffer.concat(parts);
  } catch {
    return Buffer.alloc(0);
  } finally {
    fs.closeSync(fd);
  }
}

// Every entry under out/, depth first in name order, within the limits. Names
// are read and joined as bytes, so a name that is not UTF-8 is still found
// (and reported with U+FFFD in it); links are reported, never followed.
function outDirFrames(base, limits) {
  const frames = [];
  const budget = { entries: limits.max_files + 1, bytes: limits.max_files_bytes };
  walk(Buffer.from(`${base}/${WIRE.OUT_DIR}`), WIRE.OUT_DIR, limits, budget, frames, 0);
  return frames;
}

function walk(directory, prefix, limits, budget, frames, depth) {
  let names;
  try {
    names = fs.readdirSync(directory, { encoding: 'buffer' }).sort(Buffer.compare);
  } catch {
    return; // removed or replaced by the code: nothing more to report
  }
  for (const name of names) {
    if (budget.entries <= 0 || depth > WIRE.MAX_OUT_DEPTH) return;
    const entry = Buffer.concat([directory, Buffer.from('/'), name]);
    const shown = `${prefix}/${name.toString('utf8')}`;
    let stats;
    try {
      stats = fs.lstatSync(entry);
    } catch {
      continue;
    }
    if (stats.isDirectory()) {
      walk(entry, shown, limits, budget, frames, depth + 1);
      continue;
    }
    budget.entries -= 1;
    const kind = kindOf(stats);
    frames.push(headerFrame(WIRE.FILE_OUT, { path: shown, kind, size: stats.size }));
    if (kind === 'file') {
      const data = readFileCapped(entry, Math.min(limits.max_file_bytes, budget.bytes));
      budget.bytes -= data.length;
      frames.push(...contentFrames(data));
    }
  }
}

// --- errors ----------------------------------------------------------------------

// The stack from the code's own frames: the lines from this program's frames
// (and node's vm, which called into the code) on are cut.
function codeStack(error) {
  const lines = String(error.stack).split('\n');
  const ours = lines.findIndex((line) => /^\s+at /.test(line) &&
    (line.includes(SELF) || /\(node:(internal\/)?vm:/.test(line)));
  return (ours < 0 ? lines : lines.slice(0, ours)).join('\n');
}

// The outcome's error for a thrown value or a rejection's reason, and what
// stderr shows of it.
function describe(value, origin) {
  if (value instanceof Error || (value !== null && typeof value === 'object' &&
      typeof value.stack === 'string' && typeof value.name === 'string')) {
    const text = codeStack(value);
    return { name: String(value.name), value: String(value.message), traceback: text };
  }
  const shown = util.inspect(value);
  if (origin === 'unhandledRejection') {
    return { name: 'UnhandledPromiseRejection',
             value: `the promise rejected with the reason ${shown}`,
             traceback: `UnhandledPromiseRejection: a promise rejected with ${shown}` };
  }
  return { name: 'Uncaught', value: shown, traceback: `Uncaught ${shown}` };
}

function cut(error) {
  // As pool/runcode.py cuts a Python one: the error frame stays within MAX_ERROR_BYTES.
  return { name: error.name.slice(0, WIRE.MAX_ERROR_BYTES / 4),
           value: error.value.slice(0, WIRE.MAX_ERROR_BYTES / 4),
           traceback: error.traceback.slice(-WIRE.MAX_ERROR_BYTES / 2) };
}

// --- one run -----------------------------------------------------------------------

function main() {
  const [requestFd, statusFd, readyFd] = process.argv.slice(2).map(Number);
  for (const name of WARM_MODULES) require(name);
  rehearse();
  writeAll(readyFd, Buffer.from(WIRE.READY, 'latin1'));
  fs.closeSync(readyFd);

  let request;
  try {
    request = takeRequest(requestFd);
  } catch (e) {
    writeAll(2, Buffer.from(`node_runner: ${e.message}\n`));
    process.exit(70); // as a Python child that fails: the runner reports the status
  }
  fs.closeSync(requestFd);
  fillStdin(Buffer.from(request.stdin, 'utf8'));

  let base;
  try {
    base = prepare(request);
  } catch (e) {
    writeAll(2, Buffer.from(`sandpool: cannot write the request's files: ${e.message}\n`));
    writeAll(statusFd, exitFrame(1));
    park();
  }
  run(request, base, statusFd);
}

// fd 0 is the runner's empty memfd: the stdin goes in at offset 0, written
// with pwrite so that the first read still starts at 0.
function fillStdin(data) {
  let offset = 0;
  while (offset < data.length) {
    offset += fs.writeSync(0, data, offset, data.length - offset, offset);
  }
}

function run(request, base, statusFd) {
  const filename = `${base}/main.js`; // no such file: the name the code's stack shows
  let error = null;
  let reported = false;
  let exiting = false;
  let moduleSettled = true;

  function report(status) {
    if (reported) return;
    reported = true;
    const frames = [];
    if (error !== null) frames.push(headerFrame(WIRE.ERROR, cut(error)));
    frames.push(...outDirFrames(base, request.limits), exitFrame(status));
    try {
      writeAll(statusFd, Buffer.concat(frames));
    } catch {
      realExit.call(process, status); // the code closed the status fd: the runner reports it
    }
  }

  // Last of the 'exit' listeners, whatever the code added: the outcome goes
  // when the code's own listeners have run, then this process parks.
  function onExit(code) {
    exiting = true;
    report(Number(process.exitCode ?? code) & WIRE.MAX_EXIT_CODE); // as the OS cuts it; NaN is 0
    park();
  }

  function lastOnExit() {
    process.removeListener('exit', onExit);
    process.on('exit', onExit);
  }

  const realExit = process.exit;
  process.exit = function exit(...code) {
    exiting = true;
    lastOnExit();
    return realExit.apply(process, code); // as called: exit() and exit(undefined) differ
  };

  function uncaught(value, origin) {
    if (process.listenerCount('uncaughtException') > 1) return; // the code handles it
    const described = describe(value, origin);
    writeAll(2, Buffer.from(`${described.traceback}\n`));
    if (error === null) error = described;
    if (exiting) { // thrown by an 'exit' listener: node would not run the rest
      report(1);
      park();
    }
    process.exitCode = 1;
    process.exit(1);
  }

  process.on('uncaughtException', uncaught);
  process.on('exit', onExit);
  // The loop is empty: node would exit unless a listener schedules more work.
  process.on('beforeExit', () => {
    const others = process.listenerCount('beforeExit') > 1;
    const before = others ? process.getActiveResourcesInfo().length : 0;
    process.nextTick(() => {
      if (others && process.getActiveResourcesInfo().length > before) return; // more work
      if (!moduleSettled) {
        writeAll(2, Buffer.from('Warning: Detected unsettled top-level await\n'));
        process.exitCode = UNSETTLED_TOP_LEVEL_AWAIT;
      }
      process.exit();
    });
  });

  process.argv = [process.argv[0], filename, ...request.argv];
  const code = request.code;
  let compiled;
  try {
    compiled = vm.compileFunction(code, ['exports', 'require', 'module', '__filename', '__dirname'],
                                  { filename });
  } catch (e) {
    if (e instanceof SyntaxError && MODULE_ONLY_SYNTAX.some((m) => e.message.includes(m))) {
      moduleSettled = false;
      runModule(code, base, () => { moduleSettled = true; }, uncaught);
      return;
    }
    uncaught(e, 'uncaughtException');
    return;
  }
  const module = new Module(filename, null);
  module.filename = filename;
  const codeRequire = createRequire(filename);
  module.paths = codeRequire.resolve.paths('sandpool') ?? [];
  codeRequire.main = module; // `require.main === module` holds, as for `node main.js`
  process.mainModule = module;
  compiled.call(module.exports, module.exports, codeRequire, module, filename, base);
  module.loaded = true;
}

// Code that only an ES module may hold, as a .mjs file in the working directory
// (so relative imports and import.meta.url work), removed once it has loaded.
function runModule(code, base, settled, uncaught) {
  const file = `${base}/${MODULE_FILE}`;
  try {
    const fd = fs.openSync(file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644);
    try {
      writeAll(fd, Buffer.from(code, 'utf8'));
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    uncaught(e, 'uncaughtException');
    return;
  }
  import(pathToFileURL(file).href).then(
    () => { settled(); },
    (e) => { settled(); uncaught(e, 'uncaughtException'); },
  ).finally(() => {
    try {
      fs.unlinkSync(file);
    } catch {
      // the code removed or replaced it: nothing of ours is left there
    }
  });
}

// Walk the request path once on a dummy request, so V8 has compiled it before
// a real one arrives.
function rehearse() {
  const header = Buffer.from(JSON.stringify({
    code: '', stdin: '', files: [['f', 1]], env: {}, argv: [],
    limits: Object.fromEntries(WIRE.LIMITS.map((key) => [key, 1])),
  }));
  parseRequest(header, Buffer.from('x'));
  vm.compileFunction('exports.x = [1, 2].map((i) => i * 2);', ['exports'], { filename: 'warm' })(
    {});
  createRequire(SELF);
  Buffer.concat([headerFrame(WIRE.FILE_OUT, { path: `${WIRE.OUT_DIR}/x`, kind: 'file', size: 1 }),
                 ...contentFrames(Buffer.from('x')), exitFrame(0)]);
  // The code's stdout and stderr streams, made now (node makes them on first
  // use) and written once with nothing: fds 1 and 2 are already the code's,
  // and an empty write on a pipe wakes no reader.
  process.stdout.write('');
  process.stderr.write('');
  const nowhere = new (require('stream').Writable)({ write: (chunk, encoding, done) => done() });
  const quiet = new console.Console({ stdout: nowhere });
  quiet.log('%s %d %j', 'x', 1, { a: [1, 'b'] });
  quiet.log({ a: [1, 'b'] });
  for (const stats of [fs.lstatSync('/'), fs.lstatSync('/dev/null')]) {
    if (!WIRE.FILE_KINDS.includes(kindOf(stats))) throw new Error('kindOf: not a wire file kind');
  }
}

main();
