// The JS SDK's port features (watchPorts, proxyPort; contract §3.5, §3.6) against a Wisp
// server. Run by tests/functional/test_ports.py with Node 24; prints one line per check
// and exits non-zero on the first failure.
import assert from 'node:assert/strict';
import { randomBytes, createHash } from 'node:crypto';
import net from 'node:net';
import { SpritesClient } from '@fly/sprites';

const client = new SpritesClient(process.env.WISP_TOKEN, { baseURL: process.env.WISP_API });
const name = `js-ports-${Date.now()}`;
const step = (what) => console.log(`ok ${what}`);
const sha = (buf) => createHash('sha256').update(buf).digest('hex');

// Next event of the watcher, failing after 30 s.
async function next(watcher) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('no port event within 30 s')), 30_000);
  });
  try {
    return await Promise.race([watcher.next(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// Connect to the proxy's local port, send `data`, collect what comes back until the
// connection ends (ended by us once `want` bytes came, if given).
function roundTrip(port, data, want) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    const socket = net.connect(port, 'localhost', () => socket.write(data));
    socket.on('data', (chunk) => {
      chunks.push(chunk);
      size += chunk.length;
      if (want !== undefined && size >= want) socket.end();
    });
    socket.on('close', () => resolve(Buffer.concat(chunks)));
    socket.on('error', reject);
  });
}

const sprite = await client.createSprite(name);
try {
  const watcher = await sprite.watchPorts();
  const list = await next(watcher);
  assert.equal(list.type, 'port_list');
  assert.ok(Array.isArray(list.ports));
  step('watchPorts: port_list');

  await sprite.execFile('sh', ['-c', 'setsid nc -l -p 9200 -e cat </dev/null >/dev/null 2>&1 &']);
  const opened = await next(watcher);
  assert.equal(opened.type, 'port_opened');
  assert.equal(opened.port, 9200);
  const pid = Number((await sprite.execFile('pidof', ['nc'])).stdout.trim());
  assert.equal(opened.pid, pid);
  step('watchPorts: port_opened with port and pid');

  const session = await sprite.proxyPort(0, 9200);
  const local = Number(session.localAddr().split(':').pop());
  const data = randomBytes(4 * 1024 * 1024);
  const echo = await roundTrip(local, data, data.length);
  assert.equal(echo.length, data.length);
  assert.equal(sha(echo), sha(data));
  step('proxyPort: 4 MiB echoed intact');

  const closed = await next(watcher);
  assert.deepEqual(closed, { ...opened, type: 'port_closed' });
  step('watchPorts: port_closed');

  const refused = await sprite.proxyPort(0, 1);
  const nothing = await roundTrip(Number(refused.localAddr().split(':').pop()), 'x');
  assert.equal(nothing.length, 0);
  refused.close();
  session.close();
  watcher.close();
  step('proxyPort: a closed port drops the local connection');
} finally {
  await client.deleteSprite(name);
}
step('delete');
