// runbookd web page: a client of the public API only. No build step, no dependencies.
// Safety rule: text from runbooks, runs and errors only ever reaches the DOM through
// textContent / text nodes, never innerHTML.
'use strict';

(function () {
  const TOKEN_KEY = 'runbookd.token';
  const VARS_KEY = 'runbookd.vars.';
  /** Lines of output kept in the DOM; the rest is one download away. */
  const MAX_DOM_LINES = 5000;

  const main = document.getElementById('main');
  const state = { token: sessionStorage.getItem(TOKEN_KEY), me: null, reason: '' };
  /** Things to stop when leaving the current view (streams, timers). */
  let cleanups = [];
  /** Counts route changes: a view whose request returns after a newer route draws nothing. */
  let viewGen = 0;

  // ---------------------------------------------------------------------------------------
  // DOM helpers
  // ---------------------------------------------------------------------------------------

  /** el('a', {href: '#/', class: 'x'}, 'text', child) — attributes set one by one, text as text. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key === 'style') throw new Error('no inline styles');
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function show(...nodes) {
    main.replaceChildren(...nodes);
  }

  const enc = encodeURIComponent;

  function fmtTime(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined) return '—';
    if (ms < 1000) return ms + ' ms';
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + ' s';
    const m = Math.floor(s / 60);
    if (m < 60) return m + ' min ' + Math.round(s % 60) + ' s';
    return Math.floor(m / 60) + ' h ' + (m % 60) + ' min';
  }

  function fmtBytes(n) {
    if (n < 1024) return n + ' B';
    if (n < 1048576) return (n / 1024).toFixed(1) + ' KiB';
    return (n / 1048576).toFixed(1) + ' MiB';
  }

  function statusBadge(status) {
    return el('span', { class: 'badge status-' + status, text: String(status).replace('_', ' ') });
  }

  // ---------------------------------------------------------------------------------------
  // API
  // ---------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body, retryAfter) {
      super((body && body.error) || ('HTTP ' + status));
      this.status = status;
      this.body = body || {};
      this.retryAfter = retryAfter;
    }
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    if (state.token) headers.Authorization = 'Bearer ' + state.token;
    return headers;
  }

  async function api(method, path, body) {
    const headers = authHeaders(body === undefined ? {} : { 'Content-Type': 'application/json' });
    let resp;
    try {
      resp = await fetch(path, {
        method, headers, cache: 'no-store',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, { error: 'cannot reach runbookd (' + e.message + ')' });
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (resp.status === 401 && state.token) {
      signOut('Signed out: ' + ((data && data.error) || 'the token was refused') + '.');
      throw new ApiError(401, data);
    }
    if (!resp.ok) throw new ApiError(resp.status, data, resp.headers.get('Retry-After'));
    return data;
  }

  /** A message box for a failed request, in words, with what can be done about it. */
  function errorBox(e, what) {
    const box = el('div', { class: 'alert', role: 'alert' });
    const msg = e instanceof ApiError ? e.message : String(e && e.message || e);
    let text;
    switch (e && e.status) {
      case 0: text = msg; break;
      case 400: text = (what ? what + ': ' : '') + msg; break;
      case 403: text = 'Not allowed. ' + msg; break;
      case 404: text = 'Not found: ' + msg; break;
      case 409: text = msg; break;
      case 429: text = msg + (e.retryAfter ? ' Try again in ' + e.retryAfter + ' s.' : ' Try again later.'); break;
      case 503: text = msg + (e.retryAfter ? ' Try again in ' + e.retryAfter + ' s.' : ''); break;
      default: text = (what ? what + ' failed: ' : '') + msg;
    }
    box.append(el('div', { text }));
    const errors = e && e.body && Array.isArray(e.body.errors) ? e.body.errors : [];
    if (errors.length > 1) box.append(el('ul', {}, errors.map((x) => el('li', { text: x }))));
    const ids = e && e.body && Array.isArray(e.body.run_ids) ? e.body.run_ids : [];
    if (ids.length) {
      box.append(el('div', {}, 'Running now: ', ids.map((id, i) => [i ? ', ' : '', el('a', { href: '#/runs/' + enc(id), text: id })])));
    }
    return box;
  }

  // ---------------------------------------------------------------------------------------
  // Sign in
  // ---------------------------------------------------------------------------------------

  function signOut(reason) {
    state.token = null;
    state.me = null;
    state.reason = reason || '';
    sessionStorage.removeItem(TOKEN_KEY);
    route();
  }

  async function signedIn(token) {
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    state.reason = '';
    await loadMe();
    route();
  }

  async function loadMe() {
    const config = await api('GET', '/api/config');
    state.me = config.token;
    const admin = (config.config_items || []).find((i) => i.name === 'ADMIN_ROLES');
    state.adminRoles = String(admin ? admin.value : 'admin').split(',').map((r) => r.trim()).filter(Boolean);
  }

  function renderHeader() {
    const nav = document.getElementById('nav');
    const who = document.getElementById('who');
    const out = document.getElementById('sign-out');
    const on = !!state.token;
    nav.hidden = !on;
    out.hidden = !on;
    who.textContent = on && state.me ? state.me.user_id + ' (' + (state.me.roles || []).join(', ') + ')' : '';
    const where = location.hash.startsWith('#/runs') ? 'runs' : 'runbooks';
    for (const a of nav.querySelectorAll('a')) {
      if (a.dataset.nav === where) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
  }

  function viewSignIn() {
    const reason = state.reason ? el('div', { class: 'alert', role: 'alert', text: state.reason }) : null;
    const devStatus = el('div', { class: 'muted', text: 'Checking whether dev login is on…' });
    const devError = el('div');
    const subject = el('input', { id: 'dev-subject', name: 'subject', value: 'dev-user-1', autocomplete: 'username', required: true });
    const roles = el('input', { id: 'dev-roles', name: 'roles', value: 'developer' });
    const devForm = el('form', { id: 'dev-login', class: 'panel', hidden: true },
      el('h2', { text: 'Dev login' }),
      el('p', { class: 'muted', text: 'This server has dev login on: choose who you are.' }),
      el('div', { class: 'field' }, el('label', { for: 'dev-subject', text: 'Subject' }), subject),
      el('div', { class: 'field' }, el('label', { for: 'dev-roles', text: 'Roles' }),
        el('span', { class: 'help', id: 'roles-help', text: 'Comma separated, e.g. developer, admin' }), roles),
      devError,
      el('button', { class: 'primary', type: 'submit', text: 'Sign in' }));
    roles.setAttribute('aria-describedby', 'roles-help');
    devForm.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      devError.replaceChildren();
      const list = roles.value.split(',').map((r) => r.trim()).filter(Boolean);
      try {
        const data = await api('POST', '/dev-login', { subject: subject.value.trim(), roles: list });
        await signedIn(data.access_token);
      } catch (e) {
        devError.replaceChildren(errorBox(e, 'Dev login'));
      }
    });
    const tokenInput = el('textarea', { id: 'token', name: 'token', autocomplete: 'off', spellcheck: 'false', required: true });
    const tokenError = el('div');
    const tokenForm = el('form', { id: 'token-login', class: 'panel' },
      el('h2', { text: 'Sign in with a token' }),
      el('div', { class: 'field' }, el('label', { for: 'token', text: 'Bearer token (JWT)' }),
        el('span', { class: 'help', text: 'Kept in this tab only (sessionStorage), never put in a URL.' }), tokenInput),
      tokenError,
      el('button', { class: 'primary', type: 'submit', text: 'Use token' }));
    tokenForm.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      tokenError.replaceChildren();
      const token = tokenInput.value.trim().replace(/^Bearer\s+/i, '');
      if (!token) {
        tokenError.replaceChildren(el('div', { class: 'alert', role: 'alert', text: 'Paste a token first.' }));
        return;
      }
      state.token = token;
      try {
        await loadMe();
        await signedIn(token);
      } catch (e) {
        state.token = null;
        if (!state.reason) tokenError.replaceChildren(errorBox(e, 'Signing in'));
        else route();
      }
    });
    show(el('h1', { text: 'Sign in' }), reason, devStatus, el('div', { class: 'grid2' }, devForm, tokenForm));
    // A deliberately invalid body: 400 means dev login is on (no token minted), 404 off.
    fetch('/dev-login', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{"subject":false}' })
      .then((r) => {
        if (r.status === 404) devStatus.textContent = 'Dev login is off on this server: sign in with a token.';
        else { devStatus.remove(); devForm.hidden = false; subject.focus(); }
      })
      .catch(() => { devStatus.textContent = 'Cannot reach runbookd.'; });
  }

  // ---------------------------------------------------------------------------------------
  // Runbooks
  // ---------------------------------------------------------------------------------------

  async function viewRunbooks() {
    const gen = viewGen;
    show(el('h1', { text: 'Runbooks' }), el('p', { class: 'muted', text: 'Loading…' }));
    let data;
    try { data = await api('GET', '/api/runbooks'); } catch (e) { if (gen === viewGen) show(el('h1', { text: 'Runbooks' }), errorBox(e, 'Listing runbooks')); return; }
    if (gen !== viewGen) return;
    const items = data.runbooks.map((r) => {
      const problems = r.problems || [];
      return el('li', {},
        el('div', { class: 'row' },
          el('a', { class: 'name', href: '#/runbooks/' + enc(r.filename), text: r.name }),
          el('span', { class: 'muted mono', text: r.filename }),
          problems.length ? el('span', { class: 'badge bad', text: 'malformed' }) : null),
        r.description ? el('div', { text: r.description }) : null,
        problems.length ? el('details', {}, el('summary', { text: problems.length === 1 ? 'Why it is malformed' : problems.length + ' problems' }),
          el('ul', {}, problems.map((p) => el('li', { text: p })))) : null);
    });
    show(el('h1', { text: 'Runbooks' }),
      el('div', { class: 'panel' }, items.length ? el('ul', { class: 'books' }, items) : el('p', { text: 'No runbooks in the runbooks directory.' })));
  }

  /** Splits a runbook into its document part and its History entries (oldest first). */
  function splitHistory(text) {
    const lines = text.split(/\r?\n/);
    let fence = null;
    let at = -1;
    for (let i = 0; i < lines.length; i++) {
      const f = /^\s*(`{3,}|~{3,})/.exec(lines[i]);
      if (f) {
        if (!fence) fence = f[1];
        else if (f[1][0] === fence[0] && f[1].length >= fence.length) fence = null;
        continue;
      }
      if (!fence && /^#[ \t]+history[ \t]*$/i.test(lines[i])) { at = i; break; }
    }
    if (at < 0) return { doc: text, intro: '', entries: [] };
    const entries = [];
    const intro = [];
    let cur = null;
    fence = null;
    for (const line of lines.slice(at + 1)) {
      const f = /^\s*(`{3,}|~{3,})/.exec(line);
      if (f) {
        if (!fence) fence = f[1];
        else if (f[1][0] === fence[0] && f[1].length >= fence.length) fence = null;
      }
      if (!fence && !f && line.startsWith('### ')) {
        cur = { head: line.slice(4), body: [] };
        entries.push(cur);
      } else if (cur) cur.body.push(line);
      else intro.push(line);
    }
    return { doc: lines.slice(0, at).join('\n'), intro: intro.join('\n'), entries };
  }

  /** Inline markdown: `code`, **bold**, *em*, [text](http...) — built as nodes. */
  function inline(text) {
    const out = [];
    const re = /(`+)([\s\S]*?)\1|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;
    let last = 0;
    let m;
    while ((m = re.exec(text))) {
      if (m.index > last) out.push(text.slice(last, m.index));
      if (m[1]) out.push(el('code', { text: m[2] }));
      else if (m[3]) out.push(el('strong', { text: m[3] }));
      else if (m[4]) out.push(el('em', { text: m[4] }));
      else if (/^https?:\/\//i.test(m[6])) out.push(el('a', { href: m[6], rel: 'noopener noreferrer', text: m[5] }));
      else out.push(m[0]);
      last = re.lastIndex;
    }
    if (last < text.length) out.push(text.slice(last));
    return out;
  }

  /** Block markdown: headings, fenced code, lists, paragraphs. Raw HTML stays text. */
  function markdown(text, headingShift) {
    const root = el('div', { class: 'doc' });
    const lines = text.split(/\r?\n/);
    let para = [];
    let list = null;
    const endPara = () => {
      if (para.length) root.append(el('p', {}, inline(para.join(' '))));
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = /^\s*(`{3,}|~{3,})\s*([^`\s]*)/.exec(line);
      if (fence) {
        endPara(); list = null;
        const body = [];
        i++;
        while (i < lines.length) {
          const close = /^\s*(`{3,}|~{3,})\s*$/.exec(lines[i]);
          if (close && close[1][0] === fence[1][0] && close[1].length >= fence[1].length) break;
          body.push(lines[i]);
          i++;
        }
        const code = el('code', { text: body.join('\n') });
        if (fence[2]) code.dataset.lang = fence[2];
        root.append(el('pre', {}, code));
        continue;
      }
      const h = /^(#{1,6})[ \t]+(.*?)[ \t#]*$/.exec(line);
      if (h) {
        endPara(); list = null;
        const level = Math.min(6, h[1].length + (headingShift || 0));
        root.append(el('h' + level, {}, inline(h[2])));
        continue;
      }
      const li = /^\s*([-*+]|\d+[.)])\s+(.*)$/.exec(line);
      if (li) {
        endPara();
        const tag = /\d/.test(li[1]) ? 'ol' : 'ul';
        if (!list || list.tagName.toLowerCase() !== tag) { list = el(tag); root.append(list); }
        list.append(el('li', {}, inline(li[2])));
        continue;
      }
      if (!line.trim()) { endPara(); list = null; continue; }
      list = null;
      para.push(line.trim());
    }
    endPara();
    return root;
  }

  function historyView(entries) {
    const wrap = el('div', { class: 'history' });
    for (const entry of entries.slice().reverse()) {
      const runId = (/\|\s*Run:\s*(\S+)/.exec(entry.head) || [])[1];
      const summary = el('summary', {}, entry.head.replace(/\|\s*Run:\s*\S+/, '').trim());
      const body = el('div', {},
        runId ? el('p', {}, el('a', { href: '#/runs/' + enc(runId), text: 'Open run ' + runId })) : null,
        markdown(entry.body.join('\n'), 3));
      wrap.append(el('details', {}, summary, body));
    }
    return wrap;
  }

  function loadVars(file) {
    try { return JSON.parse(localStorage.getItem(VARS_KEY + file) || '{}') || {}; } catch (e) { return {}; }
  }

  async function viewRunbook(file) {
    const gen = viewGen;
    show(el('h1', { text: file }), el('p', { class: 'muted', text: 'Loading…' }));
    let book; let env;
    try {
      [book, env] = await Promise.all([
        api('GET', '/api/runbooks/' + enc(file)),
        api('GET', '/api/runbooks/' + enc(file) + '/required-env'),
      ]);
    } catch (e) {
      if (gen === viewGen) show(el('h1', { text: file }), errorBox(e, 'Loading the runbook'));
      return;
    }
    if (gen !== viewGen) return;
    const parts = splitHistory(book.content);
    const provided = new Set((env.available || []).map((v) => v.name));
    const last = loadVars(file);
    const inputs = [];
    const fields = (env.required || []).map((v, i) => {
      const id = 'var-' + i;
      const isProvided = provided.has(v.name);
      const input = el('input', { id, name: v.name, autocomplete: 'off', spellcheck: 'false', 'aria-describedby': id + '-help' });
      if (last[v.name] !== undefined) input.value = last[v.name];
      if (!isProvided) { input.required = true; input.setAttribute('aria-required', 'true'); }
      if (isProvided) input.placeholder = 'server value';
      const err = el('div', { class: 'field-error', id: id + '-err', 'aria-live': 'polite' });
      inputs.push({ name: v.name, input, required: !isProvided, err });
      return el('div', { class: 'field' },
        el('label', { for: id }, v.name, ' ', isProvided
          ? el('span', { class: 'provided', text: '(provided by the server; fill in to override)' })
          : el('span', { class: 'req', text: '(required)' })),
        el('span', { class: 'help', id: id + '-help', text: v.description || '' }),
        input, err);
    });
    const result = el('div', { 'aria-live': 'polite' });
    const runButton = el('button', { class: 'primary', type: 'submit', text: 'Execute' });
    const validateButton = el('button', { type: 'button', text: 'Validate' });
    const form = el('form', { id: 'execute-form', class: 'panel', novalidate: true },
      el('h2', { text: 'Execute' }),
      fields.length ? fields : el('p', { class: 'muted', text: 'This runbook declares no variables.' }),
      result,
      el('div', { class: 'row' }, runButton, validateButton));

    const collect = () => {
      const vars = {};
      for (const f of inputs) if (f.input.value !== '') vars[f.name] = f.input.value;
      return vars;
    };
    const checkRequired = () => {
      let first = null;
      for (const f of inputs) {
        const empty = f.required && f.input.value.trim() === '';
        f.err.textContent = empty ? f.name + ' is required.' : '';
        f.input.setAttribute('aria-invalid', empty ? 'true' : 'false');
        if (empty && !first) first = f.input;
      }
      if (first) first.focus();
      return !first;
    };
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      result.replaceChildren();
      if (!checkRequired()) {
        result.replaceChildren(el('div', { class: 'alert', role: 'alert', text: 'Fill in the required fields first.' }));
        return;
      }
      const vars = collect();
      try { localStorage.setItem(VARS_KEY + file, JSON.stringify(vars)); } catch (e) { /* storage full or off */ }
      runButton.disabled = true;
      try {
        const data = await api('POST', '/api/runbooks/' + enc(file) + '/execute?async=true', { env_vars: vars });
        location.hash = '#/runs/' + enc(data.run_id);
      } catch (e) {
        result.replaceChildren(errorBox(e, 'Execute'));
      } finally {
        runButton.disabled = false;
      }
    });
    validateButton.addEventListener('click', async () => {
      result.replaceChildren();
      try {
        const data = await api('PATCH', '/api/runbooks/' + enc(file) + '/validate', { env_vars: collect() });
        result.replaceChildren(el('div', { class: 'note ok', role: 'status' }, 'Valid: this runbook can run with these values.',
          (data.warnings || []).length ? el('ul', {}, data.warnings.map((w) => el('li', { text: 'Warning: ' + w }))) : null));
      } catch (e) {
        if (e.status === 400 && Array.isArray(e.body.errors)) {
          result.replaceChildren(el('div', { class: 'alert', role: 'alert' }, 'Not valid:',
            el('ul', {}, e.body.errors.map((x) => el('li', { text: x })))));
        } else result.replaceChildren(errorBox(e, 'Validate'));
      }
    });

    const historyPanel = el('section', { class: 'panel', 'aria-labelledby': 'history-h' },
      el('h2', { id: 'history-h', text: 'History (' + parts.entries.length + ')' }),
      parts.intro.trim() ? markdown(parts.intro, 2) : null,
      parts.entries.length ? el('details', { id: 'history' }, el('summary', { text: 'Show ' + (parts.entries.length === 1 ? '1 entry' : parts.entries.length + ' entries') + ', newest first' }), historyView(parts.entries))
        : el('p', { class: 'muted', text: 'No executions recorded yet.' }));
    show(
      el('p', {}, el('a', { href: '#/', text: '← Runbooks' }), ' · ', el('a', { href: '#/runs?runbook=' + enc(file), text: 'Runs of this runbook' })),
      el('h1', {}, book.name || file, ' ', el('span', { class: 'muted mono', text: file })),
      form,
      el('section', { class: 'panel', 'aria-label': 'Runbook document' }, markdown(parts.doc, 1)),
      historyPanel);
  }

  // ---------------------------------------------------------------------------------------
  // Runs list
  // ---------------------------------------------------------------------------------------

  const STATUSES = ['running', 'cancelling', 'succeeded', 'failed', 'cancelled', 'timed_out', 'interrupted'];

  async function viewRuns(params) {
    const runbook = params.get('runbook') || '';
    const status = params.get('status') || '';
    // The chosen runbook is an option at once, so the filter holds before the list arrives.
    const bookSelect = el('select', { id: 'filter-runbook', name: 'runbook' }, el('option', { value: '', text: 'All runbooks' }),
      runbook ? el('option', { value: runbook, text: runbook, selected: true }) : null);
    const statusSelect = el('select', { id: 'filter-status', name: 'status' }, el('option', { value: '', text: 'Any status' }),
      STATUSES.map((s) => el('option', { value: s, text: s.replace('_', ' '), selected: s === status })));
    const body = el('div', { class: 'panel' }, el('p', { class: 'muted', text: 'Loading…' }));
    const filters = el('form', { id: 'runs-filter', class: 'row panel' },
      el('label', { for: 'filter-runbook', text: 'Runbook' }), bookSelect,
      el('label', { for: 'filter-status', text: 'Status' }), statusSelect,
      el('button', { type: 'submit', text: 'Apply' }));
    const apply = (ev) => {
      if (ev) ev.preventDefault();
      const q = new URLSearchParams();
      if (bookSelect.value) q.set('runbook', bookSelect.value);
      if (statusSelect.value) q.set('status', statusSelect.value);
      const qs = q.toString();
      location.hash = '#/runs' + (qs ? '?' + qs : '');
    };
    filters.addEventListener('submit', apply);
    bookSelect.addEventListener('change', apply);
    statusSelect.addEventListener('change', apply);
    show(el('h1', { text: 'Runs' }), filters, body);
    api('GET', '/api/runbooks').then((d) => {
      for (const n of d.runbooks.map((r) => r.filename).sort()) {
        if (n !== runbook) bookSelect.append(el('option', { value: n, text: n }));
      }
    }).catch(() => { /* the filter still works by the chosen name */ });
    const q = new URLSearchParams({ limit: '100' });
    if (runbook) q.set('runbook', runbook);
    if (status) q.set('status', status);
    let data;
    const gen = viewGen;
    try { data = await api('GET', '/api/runs?' + q); } catch (e) { body.replaceChildren(errorBox(e, 'Listing runs')); return; }
    if (gen !== viewGen) return;
    if (!data.runs.length) { body.replaceChildren(el('p', { text: 'No runs match.' })); return; }
    const rows = data.runs.map((r) => el('tr', {},
      el('td', { 'data-label': 'Status' }, statusBadge(r.status)),
      el('td', { 'data-label': 'Runbook' }, el('a', { href: '#/runs/' + enc(r.run_id), text: r.runbook, 'aria-label': 'Open run of ' + r.runbook + ' started ' + fmtTime(r.started_at) })),
      el('td', { 'data-label': 'Started by', text: r.user }),
      el('td', { 'data-label': 'Started', text: fmtTime(r.started_at) }),
      el('td', { 'data-label': 'Duration', text: r.duration_ms === null ? (r.status === 'running' ? 'running' : '—') : fmtDuration(r.duration_ms) })));
    body.replaceChildren(el('table', { class: 'runs' },
      el('thead', {}, el('tr', {}, ['Status', 'Runbook', 'Started by', 'Started', 'Duration'].map((h) => el('th', { scope: 'col', text: h })))),
      el('tbody', {}, rows)));
  }

  // ---------------------------------------------------------------------------------------
  // The terminal: \r, ANSI SGR colours, other escapes removed, stderr marked, bounded DOM
  // ---------------------------------------------------------------------------------------

  const PLAIN = Object.freeze({});

  function sgr(style, params) {
    const s = Object.assign({}, style);
    const p = params === '' ? [0] : params.split(/[;:]/).map((x) => (x === '' ? 0 : parseInt(x, 10)));
    for (let i = 0; i < p.length; i++) {
      const n = p[i];
      if (n === 0) { for (const k of Object.keys(s)) delete s[k]; }
      else if (n === 1) s.b = true;
      else if (n === 2) s.dim = true;
      else if (n === 3) s.it = true;
      else if (n === 4) s.ul = true;
      else if (n === 22) { delete s.b; delete s.dim; }
      else if (n === 23) delete s.it;
      else if (n === 24) delete s.ul;
      else if (n >= 30 && n <= 37) s.fg = n - 30;
      else if (n >= 90 && n <= 97) s.fg = n - 90 + 8;
      else if (n === 39) delete s.fg;
      else if (n >= 40 && n <= 47) s.bg = n - 40;
      else if (n >= 100 && n <= 107) s.bg = n - 100 + 8;
      else if (n === 49) delete s.bg;
      else if (n === 38 || n === 48) {
        const key = n === 38 ? 'fg' : 'bg';
        if (p[i + 1] === 5 && i + 2 < p.length) { s[key] = color256(p[i + 2]); i += 2; }
        else if (p[i + 1] === 2 && i + 4 < p.length) { s[key] = 'rgb(' + p.slice(i + 2, i + 5).map((v) => Math.max(0, Math.min(255, v))).join(',') + ')'; i += 4; }
      }
    }
    return Object.keys(s).length ? Object.freeze(s) : PLAIN;
  }

  function color256(n) {
    if (n < 16) return n;
    if (n >= 232) { const v = 8 + (n - 232) * 10; return 'rgb(' + v + ',' + v + ',' + v + ')'; }
    const c = n - 16;
    const lv = (x) => (x ? 55 + x * 40 : 0);
    return 'rgb(' + lv(Math.floor(c / 36)) + ',' + lv(Math.floor(c / 6) % 6) + ',' + lv(c % 6) + ')';
  }

  /** The escape sequence at text[i] (an ESC): {len, sgr?} or null when it is not complete yet. */
  function escapeAt(text, i) {
    if (i + 1 >= text.length) return null;
    const kind = text[i + 1];
    if (kind === '[') {
      let j = i + 2;
      while (j < text.length && j - i < 64) {
        const c = text.charCodeAt(j);
        if (c >= 0x40 && c <= 0x7e) {
          const params = text.slice(i + 2, j);
          return { len: j - i + 1, sgr: text[j] === 'm' && /^[0-9;:]*$/.test(params) ? params : undefined };
        }
        if (c < 0x20 || c > 0x3f && !(c >= 0x20 && c <= 0x2f)) return { len: j - i };
        j++;
      }
      return j - i >= 64 ? { len: j - i } : null;
    }
    if (kind === ']' || kind === 'P' || kind === '_' || kind === '^' || kind === 'X') {
      for (let j = i + 2; j < text.length && j - i < 4096; j++) {
        if (text[j] === '\x07') return { len: j - i + 1 };
        if (text[j] === '\x1b' && text[j + 1] === '\\') return { len: j - i + 2 };
        if (text[j] === '\x1b' && j + 1 >= text.length) return null;
      }
      return text.length - i >= 4096 ? { len: 2 } : null;
    }
    if ('()*+-./#%'.includes(kind)) return i + 2 < text.length ? { len: 3 } : null;
    return { len: 2 };
  }

  class Terminal {
    constructor(pane, notice) {
      this.pane = pane;
      this.notice = notice;
      this.lines = []; // {stream, segs: [{t, s}], len, node, dirty}
      this.count = 0;
      this.domStart = 0;
      this.open = { stdout: null, stderr: null };
      this.col = { stdout: 0, stderr: 0 };
      this.style = { stdout: PLAIN, stderr: PLAIN };
      this.partial = { stdout: '', stderr: '' };
      this.dirty = [];
      this.scheduled = false;
      this.follow = true;
      this.onNotice = null;
      pane.addEventListener('scroll', () => {
        this.follow = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 8;
      });
    }

    lineFor(stream) {
      let line = this.open[stream];
      if (!line) {
        line = { stream, segs: [], len: 0, node: null, index: this.count++ };
        this.lines.push(line);
        this.open[stream] = line;
        this.col[stream] = 0;
        this.mark(line);
      }
      return line;
    }

    mark(line) {
      if (!line.dirty) { line.dirty = true; this.dirty.push(line); }
    }

    put(stream, text) {
      const line = this.lineFor(stream);
      const style = this.style[stream];
      const col = this.col[stream];
      if (col >= line.len) {
        if (col > line.len) append(line, ' '.repeat(col - line.len), PLAIN);
        append(line, text, style);
      } else {
        const end = col + text.length;
        const segs = cut(line.segs, 0, col).concat([{ t: text, s: style }], cut(line.segs, end, Infinity));
        line.segs = [];
        line.len = 0;
        for (const seg of segs) append(line, seg.t, seg.s);
      }
      this.col[stream] = col + text.length;
      this.mark(line);
    }

    write(stream, data) {
      const text = this.partial[stream] + data;
      this.partial[stream] = '';
      let run = '';
      const flush = () => { if (run) { this.put(stream, run); run = ''; } };
      for (let i = 0; i < text.length;) {
        const ch = text[i];
        const code = text.charCodeAt(i);
        if (ch === '\n') {
          flush();
          this.lineFor(stream);
          this.open[stream] = null;
          i++;
        } else if (ch === '\r') {
          flush();
          this.col[stream] = 0;
          i++;
        } else if (ch === '\x1b') {
          flush();
          const esc = escapeAt(text, i);
          if (!esc) { this.partial[stream] = text.slice(i); break; }
          if (esc.sgr !== undefined) this.style[stream] = sgr(this.style[stream], esc.sgr);
          i += esc.len;
        } else if (ch === '\b') {
          flush();
          this.col[stream] = Math.max(0, this.col[stream] - 1);
          i++;
        } else if (ch === '\t') {
          run += '    '.slice((this.col[stream] + run.length) % 4);
          i++;
        } else if (code < 0x20 || code === 0x7f) {
          i++;
        } else {
          run += ch;
          i++;
        }
      }
      flush();
      this.schedule();
    }

    schedule() {
      if (this.scheduled) return;
      this.scheduled = true;
      const run = () => { if (this.scheduled) { this.scheduled = false; this.render(); } };
      requestAnimationFrame(run);
      // Background tabs get no animation frames: render at a slower pace there.
      if (document.hidden) setTimeout(run, 250);
    }

    render() {
      const start = Math.max(0, this.count - MAX_DOM_LINES);
      while (this.domStart < start) {
        const line = this.lines[this.domStart - (this.count - this.lines.length)];
        if (line && line.node) { line.node.remove(); line.node = null; }
        this.domStart++;
      }
      // Forget lines that left the DOM and can no longer change.
      const keepFrom = Math.max(0, start - (this.count - this.lines.length));
      if (keepFrom > 1000) {
        const dropped = this.lines.splice(0, keepFrom);
        for (const l of dropped) if (l.node) { l.node.remove(); l.node = null; }
      }
      const frag = document.createDocumentFragment();
      for (const line of this.dirty) {
        line.dirty = false;
        if (line.index < start) continue;
        const node = renderLine(line);
        if (line.node) line.node.replaceWith(node);
        else frag.append(node);
        line.node = node;
      }
      this.dirty = [];
      this.pane.append(frag);
      if (start > 0) {
        this.notice.hidden = false;
        this.noticeText.textContent = 'Showing the last ' + MAX_DOM_LINES.toLocaleString() + ' of ' + this.count.toLocaleString() + ' lines. ';
      }
      if (this.follow) this.pane.scrollTop = this.pane.scrollHeight;
    }
  }

  function append(line, text, style) {
    if (!text) return;
    const last = line.segs[line.segs.length - 1];
    if (last && last.s === style) last.t += text;
    else line.segs.push({ t: text, s: style });
    line.len += text.length;
  }

  function cut(segs, from, to) {
    const out = [];
    let pos = 0;
    for (const seg of segs) {
      const a = Math.max(from, pos);
      const b = Math.min(to, pos + seg.t.length);
      if (a < b) out.push({ t: seg.t.slice(a - pos, b - pos), s: seg.s });
      pos += seg.t.length;
    }
    return out;
  }

  function renderLine(line) {
    const node = document.createElement('div');
    node.className = line.stream === 'stderr' ? 'line err' : 'line';
    node.dataset.stream = line.stream;
    if (line.stream === 'stderr') {
      const tag = document.createElement('span');
      tag.className = 'tag';
      tag.textContent = 'stderr';
      node.append(tag);
    }
    const text = document.createElement('span');
    text.className = 'text';
    for (const seg of line.segs) {
      if (seg.s === PLAIN) { text.append(seg.t); continue; }
      const span = document.createElement('span');
      const cls = [];
      const s = seg.s;
      if (s.b) cls.push('b');
      if (s.dim) cls.push('dim');
      if (s.it) cls.push('it');
      if (s.ul) cls.push('ul');
      if (typeof s.fg === 'number') cls.push('fg-' + s.fg);
      else if (s.fg) span.style.color = s.fg; // CSSOM, allowed under the CSP
      if (typeof s.bg === 'number') cls.push('bg-' + s.bg);
      else if (s.bg) span.style.backgroundColor = s.bg;
      span.className = cls.join(' ');
      span.textContent = seg.t;
      text.append(span);
    }
    node.append(text);
    return node;
  }

  // ---------------------------------------------------------------------------------------
  // Following a run: fetch() with the token in a header, SSE parsed by hand, resume with
  // Last-Event-ID after a drop.
  // ---------------------------------------------------------------------------------------

  function sseParser(onEvent) {
    let buf = '';
    let event = '';
    let data = [];
    let id = null;
    return (text) => {
      buf += text;
      let pos = 0;
      let nl;
      while ((nl = buf.indexOf('\n', pos)) >= 0) {
        let line = buf.slice(pos, nl);
        pos = nl + 1;
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (data.length) onEvent({ event: event || 'message', data: data.join('\n'), id });
          event = ''; data = []; id = null;
          continue;
        }
        if (line[0] === ':') continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value[0] === ' ') value = value.slice(1);
        if (field === 'event') event = value;
        else if (field === 'data') data.push(value);
        else if (field === 'id') id = value;
      }
      buf = buf.slice(pos);
    };
  }

  const sleep = (ms, signal) => new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });

  /** Follows the run's events until `done`; calls ui.onConn(state), ui.onDone(record). */
  async function follow(runId, term, ui, signal) {
    let last = null;
    let finished = false;
    let failures = 0;
    while (!finished && !signal.aborted) {
      const headers = authHeaders({ Accept: 'text/event-stream' });
      if (last !== null) headers['Last-Event-ID'] = String(last);
      ui.onConn(last === null && failures === 0 ? 'connecting' : 'reconnecting');
      try {
        const resp = await fetch('/api/runs/' + enc(runId) + '/events?format=json', { headers, signal, cache: 'no-store' });
        if (resp.status === 204) { ui.onDone(null); return; }
        if (!resp.ok) {
          let body = null;
          try { body = await resp.json(); } catch (e) { body = null; }
          if (resp.status === 401) { signOut('Signed out: ' + ((body && body.error) || 'the token was refused') + '.'); return; }
          if (resp.status >= 500 || resp.status === 429) throw new ApiError(resp.status, body);
          ui.onError(new ApiError(resp.status, body, resp.headers.get('Retry-After')));
          return;
        }
        ui.onConn('live');
        failures = 0;
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        const pending = [];
        const feed = sseParser((ev) => pending.push(ev));
        const handle = (ev) => {
          if (ev.event === 'stdout' || ev.event === 'stderr') {
            const seq = Number(ev.id);
            if (last !== null && seq <= last) return;
            last = seq;
            let chunk;
            try { chunk = JSON.parse(ev.data); } catch (e) { return; }
            term.write(ev.event, chunk.text);
          } else if (ev.event === 'truncated') {
            try { ui.onTruncated(JSON.parse(ev.data)); } catch (e) { /* ignore */ }
          } else if (ev.event === 'done') {
            finished = true;
            if (ev.id) last = Number(ev.id);
            let record = null;
            try { record = JSON.parse(ev.data); } catch (e) { record = null; }
            ui.onDone(record);
          }
        };
        let slice = performance.now();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          feed(decoder.decode(value, { stream: true }));
          // A long replay is handled in slices of ~10 ms so that clicks and drawing go on.
          for (const ev of pending.splice(0)) {
            handle(ev);
            if (performance.now() - slice > 10) {
              await sleep(0);
              slice = performance.now();
              if (signal.aborted) return;
            }
          }
          if (finished) { reader.cancel().catch(() => {}); break; }
        }
      } catch (e) {
        if (signal.aborted) return;
        failures++;
      }
      if (finished || signal.aborted) return;
      ui.onConn('reconnecting');
      await sleep(Math.min(500 * Math.pow(2, failures), 5000), signal);
    }
  }

  async function downloadLog(runId, stream) {
    const data = await api('POST', '/api/runs/' + enc(runId) + '/download-link' + (stream ? '?stream=' + stream : ''));
    const a = el('a', { href: data.url, download: '' });
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
  }

  async function viewRun(runId) {
    const gen = viewGen;
    show(el('h1', { text: 'Run' }), el('p', { class: 'muted', text: 'Loading…' }));
    let record;
    try { record = await api('GET', '/api/runs/' + enc(runId)); } catch (e) {
      if (gen === viewGen) show(el('h1', { text: 'Run ' + runId }), errorBox(e, 'Loading the run'));
      return;
    }
    if (gen !== viewGen) return;
    const controller = new AbortController();
    cleanups.push(() => controller.abort());

    const facts = el('dl', { class: 'facts' });
    const reason = el('div', { 'aria-live': 'polite' });
    const actionResult = el('div', { 'aria-live': 'polite' });
    const conn = el('span', { class: 'conn', role: 'status', id: 'conn' });
    const cancelButton = el('button', { type: 'button', class: 'danger', id: 'cancel', text: 'Cancel run' });
    const downloadButton = el('button', { type: 'button', id: 'download', text: 'Download log' });
    const wrapBox = el('input', { type: 'checkbox', id: 'wrap' });
    const followBox = el('input', { type: 'checkbox', id: 'follow', checked: true });
    const pane = el('div', { class: 'term', id: 'output', role: 'log', 'aria-label': 'Output', tabindex: '0' });
    const noticeText = el('span');
    const noticeButton = el('button', { type: 'button', id: 'full-log', text: 'Download the full log' });
    const notice = el('div', { class: 'note term-notice', id: 'term-notice', hidden: true }, noticeText, noticeButton);
    const term = new Terminal(pane, notice);
    term.noticeText = noticeText;
    let truncated = false;
    let timer = null;

    const renderFacts = (r) => {
      record = r;
      const running = r.status === 'running' || r.status === 'cancelling';
      const started = new Date(r.started_at).getTime();
      const duration = r.duration_ms !== null && r.duration_ms !== undefined ? fmtDuration(r.duration_ms)
        : (running ? fmtDuration(Math.max(0, Date.now() - started)) + ' so far' : '—');
      const exit = !r.script_started ? 'none (did not start)'
        : r.return_code === null || r.return_code === undefined ? (running ? '—' : 'none') : String(r.return_code);
      const out = (running ? 'streaming (sizes are counted at the end)' : fmtBytes(r.stdout_bytes || 0) + ' stdout, ' + fmtBytes(r.stderr_bytes || 0) + ' stderr') +
        (r.truncated || truncated ? ' — truncated (limits reached; the log holds what was kept)' : '');
      facts.replaceChildren(
        el('dt', { text: 'Status' }), el('dd', { id: 'run-status' }, statusBadge(r.status)),
        el('dt', { text: 'Exit code' }), el('dd', { id: 'run-exit', text: exit }),
        el('dt', { text: 'Started' }), el('dd', { id: 'run-started', text: fmtTime(r.started_at) }),
        el('dt', { text: 'Duration' }), el('dd', { id: 'run-duration', text: duration }),
        el('dt', { text: 'Started by' }), el('dd', { id: 'run-user', text: r.user }),
        el('dt', { text: 'Output' }), el('dd', { id: 'run-output', text: out }));
      reason.replaceChildren();
      if (!r.script_started && !running) {
        const why = (r.errors && r.errors.length ? r.errors.join('; ') : r.error) || 'unknown reason';
        reason.append(el('div', { class: 'alert', role: 'alert', id: 'run-reason', text: 'Did not start: ' + why }));
      } else if (r.error && !running) {
        reason.append(el('div', { class: 'alert', role: 'alert', id: 'run-reason', text: r.error }));
      }
      if (r.warnings && r.warnings.length) reason.append(el('div', { class: 'note' }, el('ul', {}, r.warnings.map((w) => el('li', { text: 'Warning: ' + w })))));
      // Cancel is for the user who started the run and for ADMIN_ROLES (the server decides).
      const me = state.me || {};
      const mayCancel = r.user === me.user_id || (me.roles || []).some((role) => (state.adminRoles || []).includes(role));
      cancelButton.hidden = r.status !== 'running' || !mayCancel;
      if (running && !timer) {
        timer = setInterval(() => { if (record.status === 'running' || record.status === 'cancelling') renderFacts(record); }, 1000);
        cleanups.push(() => clearInterval(timer));
      }
    };

    cancelButton.addEventListener('click', async () => {
      actionResult.replaceChildren();
      cancelButton.disabled = true;
      try {
        await api('DELETE', '/api/runs/' + enc(runId));
        renderFacts(Object.assign({}, record, { status: 'cancelling' }));
        actionResult.replaceChildren(el('div', { class: 'note', role: 'status', text: 'Cancel requested: the script is being stopped.' }));
      } catch (e) {
        actionResult.replaceChildren(errorBox(e, 'Cancel'));
      } finally {
        cancelButton.disabled = false;
      }
    });
    const download = async () => {
      actionResult.replaceChildren();
      try { await downloadLog(runId); } catch (e) { actionResult.replaceChildren(errorBox(e, 'Download')); }
    };
    downloadButton.addEventListener('click', download);
    noticeButton.addEventListener('click', download);
    wrapBox.addEventListener('change', () => pane.classList.toggle('wrap', wrapBox.checked));
    followBox.addEventListener('change', () => {
      term.follow = followBox.checked;
      if (term.follow) pane.scrollTop = pane.scrollHeight;
    });
    pane.addEventListener('scroll', () => { followBox.checked = term.follow; });

    show(
      el('p', {}, el('a', { href: '#/runs', text: '← Runs' }), ' · ', el('a', { href: '#/runbooks/' + enc(record.runbook), text: 'Runbook ' + record.runbook })),
      el('h1', {}, record.runbook, ' ', el('span', { class: 'muted mono', id: 'run-id', text: runId })),
      el('section', { class: 'panel', 'aria-label': 'Run' }, facts, reason,
        el('div', { class: 'row' }, cancelButton, downloadButton,
          el('label', {}, followBox, ' Follow output'), el('label', {}, wrapBox, ' Wrap lines'), conn),
        actionResult),
      el('div', { class: 'term-wrap' }, notice, pane));
    renderFacts(record);

    follow(runId, term, {
      onConn: (s) => {
        conn.className = 'conn ' + s;
        conn.textContent = s === 'live' ? 'live' : s === 'reconnecting' ? 'reconnecting…' : s === 'connecting' ? 'connecting…' : s;
      },
      onTruncated: () => { truncated = true; renderFacts(record); },
      onError: (e) => { conn.textContent = ''; actionResult.replaceChildren(errorBox(e, 'Following the output')); },
      onDone: async (done) => {
        term.render();
        conn.className = 'conn done';
        conn.textContent = 'finished';
        if (done && done.run_id) renderFacts(done);
        try { renderFacts(await api('GET', '/api/runs/' + enc(runId))); } catch (e) { /* shown already */ }
        if (timer) { clearInterval(timer); timer = null; }
        term.schedule();
      },
    }, controller.signal);
  }

  // ---------------------------------------------------------------------------------------
  // Routing
  // ---------------------------------------------------------------------------------------

  async function route() {
    viewGen++;
    for (const stop of cleanups) { try { stop(); } catch (e) { /* ignore */ } }
    cleanups = [];
    renderHeader();
    if (!state.token) { viewSignIn(); return; }
    if (!state.me) {
      const gen = viewGen;
      try { await loadMe(); } catch (e) { if (!state.token || gen !== viewGen) return; show(errorBox(e, 'Loading')); return; }
      if (gen !== viewGen) return;
      renderHeader();
    }
    const hash = location.hash.replace(/^#/, '') || '/';
    const [path, query] = hash.split('?');
    const params = new URLSearchParams(query || '');
    const parts = path.split('/').filter(Boolean).map((p) => { try { return decodeURIComponent(p); } catch (e) { return p; } });
    if (parts[0] === 'runs' && parts[1]) return viewRun(parts[1]);
    if (parts[0] === 'runs') return viewRuns(params);
    if (parts[0] === 'runbooks' && parts[1]) return viewRunbook(parts[1]);
    return viewRunbooks();
  }

  document.getElementById('sign-out').addEventListener('click', () => signOut('Signed out.'));
  window.addEventListener('hashchange', () => { route(); main.focus({ preventScroll: true }); });
  route();
})();
