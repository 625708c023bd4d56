// The imgpipe page. Everything shown comes from the API; text from CSVs and origins is only ever set with
// textContent (never as markup). The token lives in this tab's sessionStorage and goes in the Authorization header,
// never in a URL: images and the event stream are fetched with the header too.
'use strict';

const PAGE_PRODUCTS = 20;       // products per page in a request's view (a 10,000-image request is paged)
const THUMBNAIL_FETCHES = 4;    // thumbnails loaded at once
const RECONNECT_MS = 2000;      // after the event stream drops

const state = {
  token: sessionStorage.getItem('imgpipe-token') || '',
  file: null,
  filter: '',
  next: null,
  rows: new Map(),              // request id -> its row in the list
  summaries: new Map(),         // request id -> its latest summary
  open: null,                   // the request shown in the request view
  offset: 0,
  total: 0,
  pageLoading: false,
  pageStale: false,
  thumbnails: new Map(),        // image path -> blob: URL of the shown page's thumbnails, released when it changes
  thumbnailRound: 0,
  compareUrls: [],
  stream: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, options = {}, ...children) {
  const node = document.createElement(tag);
  if (options.className) node.className = options.className;
  if (options.text !== undefined && options.text !== null) node.textContent = String(options.text);
  for (const child of children) node.append(child);
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(2)} MB`;
}

function saved(inBytes, outBytes) {
  if (!inBytes || outBytes === null || outBytes === undefined) return '–';
  return `${Math.round((1 - outBytes / inBytes) * 100)}%`;
}

function when(iso) {
  if (!iso) return '–';
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set('Authorization', `Bearer ${state.token}`);
  return fetch(path, { ...options, headers, cache: 'no-store', credentials: 'same-origin' });
}

async function apiJson(path, options = {}) {
  const response = await api(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) showToken('a valid token is needed');
  return { response, body };
}

function problem(body, response) {
  return (body && body.message) || `HTTP ${response.status}`;
}

// token ------------------------------------------------------------------------------------------------------------

function showToken(message) {
  $('token-state').textContent = message;
  $('token-state').className = message.startsWith('a valid') ? 'error' : '';
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  state.token = $('token').value.trim();
  if (state.token) sessionStorage.setItem('imgpipe-token', state.token);
  else sessionStorage.removeItem('imgpipe-token');
  $('token').value = '';
  showToken(state.token ? 'token set for this tab' : 'no token');
  reloadList();
  listen();
});

// upload -----------------------------------------------------------------------------------------------------------

function choose(file) {
  state.file = file || null;
  $('chosen').textContent = file ? `${file.name} (${bytes(file.size)})` : '';
  $('upload-button').disabled = !file;
}

$('file').addEventListener('change', () => choose($('file').files[0]));
const drop = $('drop');
drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  if (event.dataTransfer.files.length) choose(event.dataTransfer.files[0]);
});

$('upload-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  if (!state.file) return;
  const form = new FormData();
  form.append('file', state.file, state.file.name);
  const webhook = $('webhook').value.trim();
  if (webhook) form.append('webhook_url', webhook);
  const result = $('upload-result');
  const problems = $('problems');
  problems.hidden = true;
  problems.tBodies[0].replaceChildren();
  result.className = '';
  result.textContent = 'Uploading…';
  $('upload-button').disabled = true;
  try {
    const { response, body } = await apiJson('/upload', { method: 'POST', body: form });
    if (response.status === 202 || response.status === 200) {
      result.textContent = `Accepted: ${body.products} products, ${body.images} images, request ${body.request_id}`;
      choose(null);
      $('file').value = '';
      await reloadList();
      openRequest(body.request_id);
      return;
    }
    result.className = 'error';
    result.textContent = problem(body, response);
    if (body && Array.isArray(body.problems)) {
      for (const p of body.problems) {
        problems.tBodies[0].append(el('tr', {}, el('td', { text: p.line }), el('td', { text: p.column }),
          el('td', { text: p.reason })));
      }
      problems.hidden = false;
    }
  } catch (error) {
    result.className = 'error';
    result.textContent = `The upload did not reach the daemon: ${error.message}`;
  } finally {
    $('upload-button').disabled = !state.file;
  }
});

// the list of requests ----------------------------------------------------------------------------------------------

function requestRow(summary) {
  const row = el('tr', { className: 'open-row' });
  row.dataset.id = summary.request_id;
  row.addEventListener('click', (event) => {
    if (event.target.tagName !== 'BUTTON') openRequest(row.dataset.id);
  });
  fillRow(row, summary);
  return row;
}

function fillRow(row, s) {
  const p = s.progress;
  const bar = el('progress');
  bar.max = Math.max(p.images, 1);
  bar.value = p.done + p.failed;
  const open = el('button', { className: 'quiet', text: 'Open' });
  open.addEventListener('click', () => openRequest(s.request_id));
  row.replaceChildren(
    el('td', { text: when(s.created_at) }),
    el('td', { text: `${s.source.kind}: ${s.source.name}` }),
    el('td', {}, el('span', { className: `badge ${s.status}`, text: s.status })),
    el('td', {}, bar),
    el('td', { className: 'number', text: `${p.done}/${p.images}${p.failed ? `, ${p.failed} failed` : ''}` }),
    el('td', { className: 'number', text: `${bytes(s.compression.bytes_in)} → ${bytes(s.compression.bytes_out)}` }),
    el('td', { className: 'number', text: saved(s.compression.bytes_in, s.compression.bytes_out) }),
    el('td', {}, open),
  );
}

function remember(summary) {
  state.summaries.set(summary.request_id, summary);
  const row = state.rows.get(summary.request_id);
  if (row) fillRow(row, summary);
  return row;
}

async function loadRequests(before) {
  const query = new URLSearchParams({ limit: '20' });
  if (state.filter) query.set('status', state.filter);
  if (before) query.set('before', before);
  const { response, body } = await apiJson(`/requests?${query}`);
  const message = $('requests-message');
  if (!response.ok) {
    message.className = 'error';
    message.textContent = problem(body, response);
    return;
  }
  message.className = '';
  message.textContent = '';
  const tbody = $('request-table').tBodies[0];
  for (const summary of body.requests) {
    if (state.rows.has(summary.request_id)) { remember(summary); continue; }
    const row = requestRow(summary);
    state.rows.set(summary.request_id, row);
    state.summaries.set(summary.request_id, summary);
    tbody.append(row);
  }
  if (!tbody.rows.length) message.textContent = 'No requests yet.';
  state.next = body.next;
  $('more').hidden = !body.next;
}

function reloadList() {
  state.rows.clear();
  $('request-table').tBodies[0].replaceChildren();
  return loadRequests(null);
}

$('more').addEventListener('click', () => loadRequests(state.next));
$('status-filter').addEventListener('change', () => { state.filter = $('status-filter').value; reloadList(); });

// live updates: server-sent events read with fetch(), so the token travels in a header -----------------------------

function onEvent(kind, data) {
  if (kind === 'deleted') {
    const row = state.rows.get(data.request_id);
    if (row) row.remove();
    state.rows.delete(data.request_id);
    if (state.open === data.request_id) $('r-message').textContent = 'This request was deleted.';
    return;
  }
  if (kind !== 'request') return;
  const row = remember(data);
  if (!row && (!state.filter || state.filter === data.status)) {
    const first = $('request-table').tBodies[0].rows[0];
    const newest = first ? state.summaries.get(first.dataset.id) : null;
    if (!newest || data.created_at >= newest.created_at) {
      const added = requestRow(data);
      state.rows.set(data.request_id, added);
      $('request-table').tBodies[0].prepend(added);
      $('requests-message').textContent = '';
    }
  }
  if (state.open === data.request_id) {
    showTotals(data);
    refreshPage();
  }
}

async function listen() {
  if (state.stream) state.stream.abort();
  const controller = new AbortController();
  state.stream = controller;
  const live = $('live');
  try {
    const response = await api('/events', { signal: controller.signal, headers: { Accept: 'text/event-stream' } });
    if (!response.ok) {
      live.textContent = 'not live';
      return;  // a missing token: the token form starts it again
    }
    live.textContent = '● live';
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) kind = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
        }
        if (data.length) onEvent(kind, JSON.parse(data.join('\n')));
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  if (state.stream !== controller) return;
  live.textContent = 'reconnecting…';
  setTimeout(() => { if (state.stream === controller) { reloadList(); listen(); } }, RECONNECT_MS);
}

// one request ------------------------------------------------------------------------------------------------------

function releaseUrls(list) {
  for (const url of list.splice(0)) URL.revokeObjectURL(url);
}

async function blobUrl(path, list) {
  const response = await api(path);
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).message || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  list.push(url);
  return { url, size: blob.size };
}

// An output URL under this daemon's /images is fetched here with the token; one in an object store's public
// address is not the daemon's to show.
function imagePath(outputUrl) {
  if (!outputUrl) return null;
  try {
    const url = new URL(outputUrl, location.href);
    return url.pathname.startsWith('/images/') ? url.pathname : null;
  } catch (e) { return null; }
}

function openRequest(id) {
  const changed = state.open !== id;
  state.open = id;
  if (changed) {
    state.offset = 0;
    releaseThumbnails();
  }
  $('request').hidden = false;
  $('r-id').textContent = id;
  $('r-message').textContent = '';
  const summary = state.summaries.get(id);
  if (summary) showTotals(summary);
  loadPage();
  $('request').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

function showTotals(s) {
  const p = s.progress;
  const c = s.compression;
  $('r-status').textContent = s.status;
  $('r-status').className = `badge ${s.status}`;
  $('r-source').textContent = `${s.source.kind}: ${s.source.name} · created ${when(s.created_at)}` +
    (s.completed_at ? ` · finished ${when(s.completed_at)}` : '');
  const box = (label, value) => el('div', {}, el('strong', { text: value }), el('span', { text: label }));
  $('r-totals').replaceChildren(
    box('images', p.images), box('done', p.done), box('failed', p.failed),
    box(p.cancelled !== undefined ? 'cancelled' : 'pending', p.cancelled !== undefined ? p.cancelled : p.pending),
    box('bytes in', bytes(c.bytes_in)), box('bytes out', bytes(c.bytes_out)),
    box('saved', c.bytes_in ? `${bytes(c.bytes_saved)} (${saved(c.bytes_in, c.bytes_out)})` : '–'),
    box('mean SSIM', c.ssim_mean !== null ? c.ssim_mean.toFixed(4) : '–'),
  );
  const finished = ['completed', 'completed_with_errors', 'failed', 'cancelled'].includes(s.status);
  $('r-retry').disabled = !(finished && p.failed > 0);
  $('r-cancel').disabled = finished;
  $('r-export').setAttribute('aria-disabled', String(!finished));
}

// Called for every pushed change of the open request: at most one page load runs, and one more follows it.
function refreshPage() {
  if (state.pageLoading) { state.pageStale = true; return; }
  loadPage();
}

async function loadPage() {
  const id = state.open;
  state.pageLoading = true;
  try {
    const { response, body } = await apiJson(
      `/status/${encodeURIComponent(id)}?offset=${state.offset}&limit=${PAGE_PRODUCTS}`);
    if (id !== state.open) return;
    if (!response.ok) {
      $('r-message').textContent = problem(body, response);
      return;
    }
    showTotals(body);  // the status has what a summary has, at this moment
    state.total = body.page.products_total;
    renderImages(id, body.products);
    renderDeliveries(body.webhooks);
    const last = Math.min(state.offset + PAGE_PRODUCTS, state.total);
    $('r-page').textContent = `products ${state.total ? state.offset + 1 : 0}–${last} of ${state.total}`;
    $('r-prev').disabled = state.offset === 0;
    $('r-next').disabled = last >= state.total;
  } finally {
    state.pageLoading = false;
    if (state.pageStale) { state.pageStale = false; refreshPage(); }
  }
}

function releaseThumbnails() {
  for (const url of state.thumbnails.values()) URL.revokeObjectURL(url);
  state.thumbnails.clear();
  state.thumbnailRound += 1;  // fetches still under way belong to the page left
}

function renderImages(id, products) {
  const rows = [];
  const thumbnails = [];
  products.forEach((product, p) => {
    product.images.forEach((image, index) => {
      const thumb = el('img', { className: 'thumb' });
      thumb.alt = '';
      const path = imagePath(image.output_url);
      if (path && state.thumbnails.has(path)) thumb.src = state.thumbnails.get(path);
      else if (path) thumbnails.push([thumb, path]);
      const compare = el('button', { className: 'quiet', text: 'Before / after' });
      compare.disabled = !path;
      const position = state.offset + p;
      compare.addEventListener('click', () => openCompare(id, position, index, product, image));
      rows.push(el('tr', {},
        el('td', {}, thumb),
        el('td', {}, el('div', { text: product.product_name }), el('small', { text: `#${product.serial} · ${image.input_url}` })),
        el('td', {}, el('span', { className: `badge ${image.status}`, text: image.status })),
        el('td', { className: 'number', text: bytes(image.bytes_in) }),
        el('td', { className: 'number', text: bytes(image.bytes_out) }),
        el('td', { className: 'number', text: image.bytes_out !== null ? saved(image.bytes_in, image.bytes_out) : '–' }),
        el('td', { className: 'number', text: image.ssim !== null && image.ssim !== undefined ? image.ssim.toFixed(4) : '–' }),
        el('td', { className: 'error', text: image.error || image.note || '' }),
        el('td', {}, compare)));
    });
  });
  $('images').tBodies[0].replaceChildren(...rows);
  loadThumbnails(thumbnails);
}

// A page re-rendered by pushed progress reuses the thumbnails it has; only new ones are fetched.
async function loadThumbnails(queue) {
  const round = state.thumbnailRound;
  const worker = async () => {
    for (let next = queue.shift(); next; next = queue.shift()) {
      const [img, path] = next;
      try {
        const { url } = await blobUrl(path, []);
        if (round !== state.thumbnailRound || state.thumbnails.has(path)) {
          URL.revokeObjectURL(url);
          if (state.thumbnails.has(path)) img.src = state.thumbnails.get(path);
          continue;
        }
        state.thumbnails.set(path, url);
        img.src = url;
      } catch (e) {
        img.title = e.message;
      }
    }
  };
  await Promise.all(Array.from({ length: THUMBNAIL_FETCHES }, worker));
}

function renderDeliveries(deliveries) {
  const rows = deliveries.map((d) => {
    const last = d.attempts.length ? d.attempts[d.attempts.length - 1] : null;
    const answer = last ? (last.status_code ? `HTTP ${last.status_code}` : '') + (last.error ? ` ${last.error}` : '') : '';
    return el('tr', {}, el('td', { text: d.listener }), el('td', { text: d.round }),
      el('td', {}, el('span', { className: `badge ${d.state}`, text: d.state })),
      el('td', { className: 'number', text: d.attempts.length }), el('td', { text: answer }));
  });
  if (!rows.length) {
    const none = el('td', { text: 'No webhook listeners for this request.' });
    none.colSpan = 5;
    rows.push(el('tr', {}, none));
  }
  $('deliveries').tBodies[0].replaceChildren(...rows);
}

$('r-prev').addEventListener('click', () => {
  state.offset = Math.max(0, state.offset - PAGE_PRODUCTS);
  releaseThumbnails();
  loadPage();
});
$('r-next').addEventListener('click', () => {
  state.offset += PAGE_PRODUCTS;
  releaseThumbnails();
  loadPage();
});
$('r-close').addEventListener('click', () => {
  state.open = null;
  $('request').hidden = true;
  releaseThumbnails();
});

async function command(path, done) {
  const { response, body } = await apiJson(path, { method: 'POST' });
  $('r-message').className = response.ok ? '' : 'error';
  $('r-message').textContent = response.ok ? done(body) : problem(body, response);
  if (response.ok) loadPage();
}

$('r-retry').addEventListener('click', () =>
  command(`/retry/${encodeURIComponent(state.open)}`, (b) => `Retrying ${b.images} failed images (round ${b.round}).`));
$('r-cancel').addEventListener('click', () =>
  command(`/cancel/${encodeURIComponent(state.open)}`, (b) => `Cancelled (${b.progress.done} images done).`));
$('r-export').addEventListener('click', async (event) => {
  event.preventDefault();
  try {
    const id = state.open;
    const { url } = await blobUrl(`/export/${encodeURIComponent(id)}`, []);
    const link = el('a');
    link.href = url;
    link.download = `${id}.csv`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    $('r-message').className = 'error';
    $('r-message').textContent = error.message;
  }
});

// before / after ---------------------------------------------------------------------------------------------------

async function openCompare(id, product, index, productInfo, image) {
  releaseUrls(state.compareUrls);
  $('compare').hidden = false;
  $('c-caption').textContent = `${productInfo.product_name} (#${productInfo.serial}), image ${index + 1}: ${image.input_url}`;
  $('c-sizes').textContent = '';
  $('c-message').textContent = 'Fetching the original…';
  $('c-message').className = '';
  $('c-before').removeAttribute('src');
  $('c-after').removeAttribute('src');
  try {
    const [before, after] = await Promise.all([
      blobUrl(`/requests/${encodeURIComponent(id)}/images/${product}/${index}/original`, state.compareUrls),
      blobUrl(imagePath(image.output_url), state.compareUrls),
    ]);
    await Promise.all([shown($('c-before'), before.url), shown($('c-after'), after.url)]);
    $('c-sizes').textContent = `before ${bytes(before.size)} · after ${bytes(after.size)} · ` +
      `saved ${saved(before.size, after.size)}`;
    $('c-message').textContent = '';
    $('compare').dataset.ready = 'true';
    split();
  } catch (error) {
    $('c-message').className = 'error';
    $('c-message').textContent = error.message;
  }
  $('compare').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

function shown(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve();
    img.onerror = () => reject(new Error('the browser cannot show this image'));
    img.src = url;
  });
}

// The after image lies over the before at the same size; the slider uncovers it from the right.
function split() {
  const at = $('c-slider').value;
  $('c-after').style.clipPath = `inset(0 0 0 ${at}%)`;
  $('c-divider').style.left = `${at}%`;
}

$('c-slider').addEventListener('input', split);
$('c-close').addEventListener('click', () => {
  $('compare').hidden = true;
  delete $('compare').dataset.ready;
  releaseUrls(state.compareUrls);
});

// start ------------------------------------------------------------------------------------------------------------

showToken(state.token ? 'token set for this tab' : '');
reloadList();
listen();
