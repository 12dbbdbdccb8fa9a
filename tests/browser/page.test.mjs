// Drives Debian's chromium (through playwright-core, no browser download) against a real
// runbookd started by tests/integration/browser.rs with the runbooks that test writes.
//
//   node tests/browser/page.test.mjs <runbookd base URL> <screenshot folder>
//
// Exits 0 when every check passed, 1 with the failed check otherwise. A small proxy in front
// of runbookd (all browser traffic goes through it) records each /events request and can cut
// one stream in the middle.

import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const [target, outDir] = process.argv.slice(2);
if (!target || !outDir) {
  console.error('usage: node page.test.mjs <runbookd URL> <screenshot folder>');
  process.exit(2);
}
fs.mkdirSync(outDir, { recursive: true });
const upstream = new URL(target);

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

const eventsRequests = []; // {path, lastEventId, at}
// While the window is open, new /events requests (not resumptions) are candidates; the first
// candidate to carry 3 stdout events is cut. (A candidate the page itself aborts never is.)
let cutWindowOpen = false;
let cutDone = null; // {path, afterEvents}

const proxy = http.createServer((req, res) => {
  const isEvents = /\/api\/runs\/[^/]+\/events/.test(req.url);
  if (isEvents) eventsRequests.push({ path: req.url, lastEventId: req.headers['last-event-id'] ?? null, at: Date.now() });
  const cutThis = isEvents && cutWindowOpen && !req.headers['last-event-id'];
  const headers = { ...req.headers, host: upstream.host, connection: 'close' };
  const up = http.request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers, agent: false }, (upRes) => {
    res.writeHead(upRes.statusCode, upRes.headers);
    let seen = 0;
    upRes.on('data', (chunk) => {
      res.write(chunk);
      if (cutThis && !cutDone) {
        seen += (chunk.toString('utf8').match(/event: stdout/g) || []).length;
        if (seen >= 3) {
          cutDone = { path: req.url, afterEvents: seen };
          upRes.destroy();
          res.socket.destroy();
        }
      }
    });
    upRes.on('end', () => res.end());
    upRes.on('error', () => res.destroy());
  });
  up.on('error', () => { res.destroy(); });
  req.pipe(up);
});
// Longer than the browser keeps an idle connection, so that no reused connection is closed
// under a request.
proxy.keepAliveTimeout = 120_000;
await new Promise((resolve) => proxy.listen(0, '127.0.0.1', resolve));
const base = `http://127.0.0.1:${proxy.address().port}/`;

// ---------------------------------------------------------------------------------------------
// Browser
// ---------------------------------------------------------------------------------------------

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'runbookd-chromium-'));
const browser = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1280, height: 900 },
  acceptDownloads: true,
});
const pageErrors = [];
const cspViolations = [];
const newPage = async () => {
  const page = await browser.newPage();
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) cspViolations.push(m.text()); });
  return page;
};

// page.waitForFunction evaluates its predicate with eval inside the page, which the page's
// Content-Security-Policy forbids; page.evaluate goes through the debugging protocol instead.
async function waitFor(page, fn, arg, opts = {}) {
  const timeout = opts.timeout ?? 30_000;
  const every = typeof opts.polling === 'number' ? opts.polling : 10;
  const deadline = Date.now() + timeout;
  for (;;) {
    // A navigation may replace the page's context under an evaluation: poll again.
    const value = await page.evaluate(fn, arg).catch(() => false);
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${fn}`);
    await new Promise((ok) => setTimeout(ok, every));
  }
}

let step = 'start';
const log = (msg) => console.log(`[browser] ${msg}`);
const check = (name) => { step = name; log(name); };
const T = 30_000;

async function signIn(page, subject, roles) {
  await page.waitForSelector('#dev-login:not([hidden])', { timeout: T });
  await page.fill('#dev-subject', subject);
  await page.fill('#dev-roles', roles);
  await page.press('#dev-roles', 'Enter');
  await waitFor(page, (s) => document.getElementById('who').textContent.includes(s), subject, { timeout: T });
}

async function executeFromPage(page, file) {
  await page.goto(base + '#/runbooks/' + encodeURIComponent(file));
  await page.waitForSelector('#execute-form', { timeout: T });
  await page.click('#execute-form button[type=submit]');
  await waitFor(page, () => /^#\/runs\/.+/.test(location.hash), null, { timeout: T });
  return decodeURIComponent(page.url().split('#/runs/')[1]);
}

const outputLines = (page) => page.$$eval('#output .line', (ls) => ls.map((l) => ({ stream: l.dataset.stream, text: l.querySelector('.text').textContent })));
// A final status counts once the page has also read the whole output (`finished`).
const waitStatus = (page, status, timeout = 60_000) =>
  waitFor(page, (s) => document.querySelector('#run-status')?.textContent === s &&
    (s === 'running' || document.getElementById('conn')?.textContent === 'finished'), status, { timeout });

try {
  const page = await newPage();

  check('sign in with dev login (subject and roles chosen)');
  await page.goto(base);
  await signIn(page, 'alice', 'developer, admin');
  assert.match(await page.textContent('#who'), /alice \(developer, admin\)/);
  const token = await page.evaluate(() => sessionStorage.getItem('runbookd.token'));
  assert.ok(token, 'token kept in sessionStorage');

  check('runbook list: description and a malformed badge with its reason');
  await page.waitForSelector('.books', { timeout: T });
  const broken = page.locator('.books li', { hasText: 'Broken.md' });
  await broken.locator('.badge', { hasText: 'malformed' }).waitFor({ timeout: T });
  await broken.locator('summary').click();
  assert.match(await broken.textContent(), /missing required section: # History/);
  assert.match(await page.locator('.books li', { hasText: 'Ticker.md' }).textContent(), /Prints a line every 300 ms/);
  await page.screenshot({ path: path.join(outDir, 'runbooks.png'), fullPage: true });

  check('execute form: required fields blocked when empty, Validate, last values offered again');
  await page.goto(base + '#/runbooks/Needs.md');
  await page.waitForSelector('#execute-form', { timeout: T });
  assert.match(await page.textContent('#execute-form'), /TARGET \(required\)/);
  assert.match(await page.textContent('#execute-form'), /HOME \(provided by the server/);
  assert.match(await page.textContent('#execute-form'), /Where the deployment goes/);
  await page.click('#execute-form button[type=submit]');
  await page.waitForSelector('#var-0-err:has-text("TARGET is required.")', { timeout: T });
  assert.ok(page.url().includes('#/runbooks/Needs.md'), 'nothing was sent');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'var-0', 'focus on the empty field');
  await page.fill('#var-0', 'staging');
  await page.click('#execute-form button:has-text("Validate")');
  await page.waitForSelector('.note.ok:has-text("Valid")', { timeout: T });
  const needsRun = await executeFromPage(page, 'Needs.md');
  await waitStatus(page, 'succeeded');
  assert.deepEqual((await outputLines(page)).map((l) => l.text), ['to staging']);
  await page.goto(base + '#/runbooks/Needs.md');
  await page.waitForSelector('#var-0', { timeout: T });
  assert.equal(await page.inputValue('#var-0'), 'staging');
  assert.ok(needsRun);

  check('a run that failed before its script started reads "Did not start: <reason>"');
  await executeFromPage(page, 'Broken.md');
  await waitStatus(page, 'failed');
  assert.match(await page.textContent('#run-reason'), /^Did not start: .*missing required section: # History/);
  assert.equal(await page.textContent('#run-exit'), 'none (did not start)');

  check('execute a ticker: first line visible at least 2 s before the end');
  const tickerRun = await executeFromPage(page, 'Ticker.md');
  await waitFor(page, () => [...document.querySelectorAll('#output .line .text')].some((l) => l.textContent === 'line 1'), null, { timeout: T });
  const firstSeen = Date.now();
  await waitStatus(page, 'succeeded');
  const endSeen = Date.now();
  log(`first line ${endSeen - firstSeen} ms before the end was shown`);
  assert.ok(endSeen - firstSeen >= 2000, `first line only ${endSeen - firstSeen} ms before the end`);
  assert.equal(await page.textContent('#run-exit'), '0');
  assert.match(await page.textContent('#run-duration'), /^\d+(\.\d)? s$/);
  assert.equal(await page.textContent('#run-user'), 'alice');
  assert.deepEqual((await outputLines(page)).map((l) => l.text), Array.from({ length: 10 }, (_, i) => `line ${i + 1}`));
  await page.screenshot({ path: path.join(outDir, 'finished-run.png'), fullPage: true });

  check('a second page on the run URL sees the same output live; a cut stream resumes with Last-Event-ID');
  const reconnectingShown = waitFor(page, () => document.getElementById('conn')?.textContent.includes('reconnecting'), null, { timeout: 60_000, polling: 20 });
  cutWindowOpen = true;
  const slowRun = await executeFromPage(page, 'Slow.md');
  await waitFor(page, (id) => document.getElementById('run-id')?.textContent === id, slowRun, { timeout: T });
  await new Promise((ok) => { const t = setInterval(() => { if (eventsRequests.some((r) => r.path.includes(slowRun))) { clearInterval(t); ok(); } }, 10); });
  cutWindowOpen = false;
  const page2 = await newPage();
  await page2.goto(base + '#/runs/' + encodeURIComponent(slowRun));
  await signIn(page2, 'alice', 'developer');
  await page2.waitForSelector('#output', { timeout: T });
  // Live: a line appears on the second page while the run is still going.
  await waitFor(page2, () => document.querySelectorAll('#output .line').length >= 3, null, { timeout: T });
  assert.equal(await page2.textContent('#run-status'), 'running');
  const countThen = (await outputLines(page2)).length;
  await waitFor(page2, (n) => document.querySelectorAll('#output .line').length > n, countThen, { timeout: T });
  assert.equal(await page2.textContent('#run-status'), 'running', 'a new line arrived while running');
  await page.screenshot({ path: path.join(outDir, 'run-in-progress.png'), fullPage: true });
  await reconnectingShown;
  await waitStatus(page, 'succeeded');
  await waitStatus(page2, 'succeeded');
  const expected = Array.from({ length: 24 }, (_, i) => `tick ${i + 1}`);
  assert.deepEqual((await outputLines(page)).map((l) => l.text), expected, 'every line once, in order, after the cut');
  assert.deepEqual((await outputLines(page2)).map((l) => l.text), expected);
  assert.ok(cutDone && cutDone.path.includes(encodeURIComponent(slowRun)) || cutDone.path.includes(slowRun), `the cut hit the run: ${JSON.stringify(cutDone)}`);
  const resumed = eventsRequests.filter((r) => r.path.includes(slowRun) && r.lastEventId !== null);
  assert.ok(resumed.length >= 1, `a second /events request with Last-Event-ID: ${JSON.stringify(eventsRequests)}`);
  assert.ok(Number(resumed[0].lastEventId) > 0);
  for (const r of eventsRequests) assert.ok(!r.path.includes('access_token'), 'no token in an events URL');
  await page2.close();

  check('terminal rendering: \\r progress, ANSI colours, other escapes removed, stdout/stderr order');
  await executeFromPage(page, 'Term.md');
  await waitStatus(page, 'succeeded');
  const lines = await outputLines(page);
  assert.deepEqual(lines, [
    { stream: 'stdout', text: 'progress 100%' },
    { stream: 'stdout', text: 'red plain bold green' },
    { stream: 'stdout', text: 'out1' },
    { stream: 'stderr', text: 'err1' },
    { stream: 'stdout', text: 'out2' },
  ]);
  const red = await page.$eval('#output .line:nth-child(2) .fg-1', (s) => [s.textContent, getComputedStyle(s).color]);
  assert.deepEqual(red, ['red', 'rgb(255, 123, 114)']);
  const green = await page.$eval('#output .line:nth-child(2) .b.fg-10', (s) => [s.textContent, getComputedStyle(s).fontWeight]);
  assert.deepEqual(green, ['bold green', '700']);
  const errMark = await page.$eval('#output .line.err', (l) => [l.querySelector('.tag')?.textContent, getComputedStyle(l).borderLeftStyle]);
  assert.deepEqual(errMark, ['stderr', 'solid'], 'stderr marked by a label and a bar, not colour alone');
  await page.screenshot({ path: path.join(outDir, 'terminal.png'), fullPage: true });

  check('download a log through a signed link (no token in the URL)');
  const [download] = await Promise.all([page.waitForEvent('download', { timeout: T }), page.click('#download')]);
  assert.match(download.url(), /\/logs\/download\?exp=\d+&sig=/);
  assert.ok(!download.url().includes(token) && !download.url().includes('access_token'));
  const saved = path.join(outDir, 'downloaded.log');
  await download.saveAs(saved);
  assert.match(fs.readFileSync(saved, 'utf8'), /out1\n/);

  check('cancel a run from the page');
  await executeFromPage(page, 'Forever.md');
  await waitFor(page, () => document.querySelector('#output .line .text')?.textContent === 'started', null, { timeout: T });
  await page.click('#cancel');
  await waitStatus(page, 'cancelled');
  assert.ok(await page.isHidden('#cancel'));

  check('a finished run of 200 000 lines: responsive, bounded DOM, full log offered');
  const bigRun = await page.evaluate(async () => {
    const h = { Authorization: 'Bearer ' + sessionStorage.getItem('runbookd.token'), 'Content-Type': 'application/json' };
    const r = await fetch('/api/runbooks/Big.md/execute?async=true', { method: 'POST', headers: h, body: '{}' });
    const { run_id: id } = await r.json();
    for (;;) {
      const rec = await (await fetch('/api/runs/' + id, { headers: h })).json();
      if (rec.status !== 'running') return id;
      await new Promise((ok) => setTimeout(ok, 200));
    }
  });
  await page.goto(base + '#/runs/' + encodeURIComponent(bigRun));
  await page.waitForSelector('#output .line', { timeout: T });
  const clickTimes = [];
  const toggleWrap = async () => {
    const before = await page.$eval('#output', (o) => o.classList.contains('wrap'));
    const t0 = Date.now();
    await page.click('#wrap', { timeout: 5000 });
    await waitFor(page, (b) => document.getElementById('output').classList.contains('wrap') !== b, before, { timeout: 5000, polling: 5 });
    clickTimes.push(Date.now() - t0);
  };
  // While the replay streams in, and once it is all there.
  for (let i = 0; i < 3; i++) await toggleWrap();
  await waitFor(page, () => document.getElementById('conn').textContent === 'finished', null, { timeout: 120_000 });
  await toggleWrap();
  await page.click('#follow');
  await toggleWrap();
  log(`click answered in ${clickTimes.join(', ')} ms`);
  for (const ms of clickTimes) assert.ok(ms < 1000, `a click took ${ms} ms`);
  const domLines = await page.$$eval('#output .line', (l) => l.length);
  assert.ok(domLines <= 5000, `${domLines} lines in the DOM`);
  assert.equal(await page.$eval('#output .line:last-child .text', (l) => l.textContent), '200000');
  assert.match(await page.textContent('#term-notice'), /last 5,000 of 200,000 lines/);
  await page.screenshot({ path: path.join(outDir, 'big-run.png') });
  const [full] = await Promise.all([page.waitForEvent('download', { timeout: T }), page.click('#full-log')]);
  const fullPath = path.join(outDir, 'full.log');
  await full.saveAs(fullPath);
  assert.equal(fs.readFileSync(fullPath, 'utf8').split('\n').length, 200001);

  check('open a finished run from the runs list (filtered by runbook and status)');
  await page.goto(base + '#/runs');
  await page.waitForSelector('table.runs', { timeout: T });
  await page.screenshot({ path: path.join(outDir, 'runs-list.png'), fullPage: true });
  await page.selectOption('#filter-runbook', 'Ticker.md');
  await waitFor(page, () => location.hash.includes('runbook=Ticker.md'), null, { timeout: T });
  await page.selectOption('#filter-status', 'succeeded');
  await waitFor(page, () => location.hash.includes('status=succeeded') && document.querySelectorAll('table.runs tbody tr').length === 1, null, { timeout: T });
  await page.click('table.runs tbody tr a');
  await waitFor(page, (id) => location.hash === '#/runs/' + id, tickerRun, { timeout: T });
  await waitFor(page, () => document.getElementById('conn')?.textContent === 'finished', null, { timeout: T });
  assert.equal((await outputLines(page)).length, 10);

  check('a runbook with <script> and <img onerror> in its text runs none of it');
  await page.goto(base + '#/runbooks/Evil.md');
  await page.waitForSelector('.doc', { timeout: T });
  const docText = await page.textContent('main');
  assert.ok(docText.includes('<script>window.pwned = 1</script>'), 'raw HTML shown as text');
  assert.ok(docText.includes('<img src=x onerror="window.pwned = 2">'));
  await page.click('#history summary').catch(() => {});
  await executeFromPage(page, 'Evil.md');
  await waitStatus(page, 'succeeded');
  assert.ok((await outputLines(page)).some((l) => l.text.includes('<img src=x onerror')));
  await page.goto(base + '#/runbooks/Evil.md');
  await page.waitForSelector('#history', { timeout: T });
  await page.click('#history > summary');
  await page.click('.history details summary');
  await page.waitForTimeout(300);
  await page.screenshot({ path: path.join(outDir, 'runbook.png'), fullPage: true });
  assert.equal(await page.evaluate(() => window.pwned), undefined, 'no runbook script ran');
  assert.equal(await page.$$eval('main img, main script, main iframe', (n) => n.length), 0);
  assert.equal(await page.$$eval('script', (s) => s.map((x) => x.getAttribute('src')).join(',')), '/app.js');

  check('readable at 360 px');
  await page.setViewportSize({ width: 360, height: 740 });
  await page.goto(base + '#/runs/' + encodeURIComponent(tickerRun));
  await waitFor(page, () => document.getElementById('conn')?.textContent === 'finished', null, { timeout: T });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(overflow <= 360, `page is ${overflow} px wide at 360`);
  await page.screenshot({ path: path.join(outDir, 'mobile-360.png'), fullPage: true });

  check('a 401 sends the person back to sign in with the reason');
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.evaluate(() => sessionStorage.setItem('runbookd.token', 'not-a-token'));
  await page.goto(base + '#/runs');
  await page.reload();
  await page.waitForSelector('.alert', { timeout: T });
  assert.match(await page.textContent('.alert'), /Signed out: unauthorized/);
  await page.waitForSelector('#dev-login:not([hidden])', { timeout: T });

  check('no page errors, no CSP violations');
  assert.deepEqual(pageErrors, [], JSON.stringify(pageErrors));
  assert.deepEqual(cspViolations, [], JSON.stringify(cspViolations));
  log('all checks passed');
  await browser.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  proxy.close();
  process.exit(0);
} catch (e) {
  console.error(`[browser] FAILED at "${step}": ${e && e.stack || e}`);
  console.error(`[browser] events requests: ${JSON.stringify(eventsRequests)}; cut: ${JSON.stringify(cutDone)}`);
  try {
    let n = 0;
    for (const p of browser.pages()) {
      n++;
      console.error(`[browser] page ${n} at ${p.url()}: ${(await p.textContent('body').catch(() => '')).slice(0, 2000)}`);
      await p.screenshot({ path: path.join(outDir, `failure-${n}.png`), fullPage: true });
    }
  } catch (_) { /* best effort */ }
  await browser.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  proxy.close();
  process.exit(1);
}
