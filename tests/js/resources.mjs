// The JS SDK's resources policy calls (contract §2.12) against a Wisp server. Run by
// tests/functional/test_resources.py with Node 24 on the sprite named by WISP_SPRITE;
// prints one line per check and exits non-zero on the first failure.
import assert from 'node:assert/strict';
import { SpritesClient, ExecError } from '@fly/sprites';

const client = new SpritesClient(process.env.WISP_TOKEN, { baseURL: process.env.WISP_API });
const sprite = client.sprite(process.env.WISP_SPRITE);
const defaultMB = Number(process.env.DEFAULT_MB);
const step = (what) => console.log(`ok ${what}`);
// busybox dd fills one buffer of `mb` MB from /dev/zero, touching every page
const alloc = (mb) => sprite.execFile('dd', ['if=/dev/zero', 'of=/dev/null', `bs=${mb}M`, 'count=1']);

assert.deepEqual(await sprite.getResourcesPolicy(), { memory: { limitMB: defaultMB, autoscale: true } });
step('get default');

await sprite.updateResourcesPolicy({ memory: { limitMB: 128, autoscale: true } });
assert.deepEqual(await sprite.getResourcesPolicy(), { memory: { limitMB: 128, autoscale: true } });
await sprite.updateResourcesPolicy({ memory: { limitMB: 160 } });
assert.equal((await sprite.getResourcesPolicy()).memory.limitMB, 160);
step('update + get');

await assert.rejects(alloc(200), (e) => e instanceof ExecError && e.exitCode === 137);
await alloc(64);
step('limit binds');

await assert.rejects(sprite.updateResourcesPolicy({ memory: { limitMB: 1 } }),
  (e) => /status 400/.test(e.message) && /limit_mb/.test(e.message));
step('bad limit refused');

await sprite.deleteResourcesPolicy();
assert.equal((await sprite.getResourcesPolicy()).memory.limitMB, defaultMB);
await alloc(200);
step('delete');
