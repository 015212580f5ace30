// Services through the JS SDK, for the calls only it has (restartService, getServiceLogs).
// Run by tests/functional/test_services.py; prints one line per check, exits non-zero on
// the first failure.
import assert from 'node:assert/strict';
import { SpritesClient } from '@fly/sprites';

const client = new SpritesClient(process.env.WISP_TOKEN, { baseURL: process.env.WISP_API });
const name = `js-svc-${Date.now()}`;
const step = (what) => console.log(`ok ${what}`);
const collect = async (stream) => {
  const out = [];
  for await (const ev of stream) out.push(ev);
  return out;
};

const sprite = await client.createSprite(name);
try {
  const created = await collect(await sprite.createService('web', {
    cmd: 'sh', args: ['-c', 'echo one; echo two; echo oops >&2; exec sleep 1000'],
  }, '1s'));
  assert.equal(created[0].type, 'started');
  assert.equal(created.at(-1).type, 'complete');
  const pid0 = (await sprite.getService('web')).state.pid;
  step('create');

  const restarted = await collect(await sprite.restartService('web', '500ms'));
  assert.deepEqual(restarted.map((e) => e.type).slice(0, 3), ['stopping', 'stopped', 'started']);
  assert.equal(restarted.at(-1).type, 'complete');
  const after = (await sprite.getService('web')).state;
  assert.equal(after.status, 'running');
  assert.notEqual(after.pid, pid0);
  step('restart');

  const logs = await collect(await sprite.getServiceLogs('web', { lines: 1 }));
  const out = logs.filter((e) => e.type === 'stdout').map((e) => e.data);
  const err = logs.filter((e) => e.type === 'stderr').map((e) => e.data);
  assert.deepEqual(out, ['two\n']);
  assert.deepEqual(err, ['oops\n']);
  assert.equal(logs.at(-1).type, 'complete');
  assert.equal(logs.at(-1).logFiles.combined, '/.sprite/logs/services/web.log');
  step('logs');

  await sprite.deleteService('web');
  assert.deepEqual(await sprite.listServices(), []);
} finally {
  await client.deleteSprite(name);
}
step('delete');
