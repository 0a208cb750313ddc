"""The web dashboard `farm serve` serves at `/`: jobs, a job (live progress, its gallery, each
image's parameters), workers, and a submit page. Plain HTML with a little JavaScript over the
REST API (`/v1`), no build step. With tokens on, `/login` keeps the token in an HttpOnly,
SameSite=Strict cookie, which the API reads as it reads a bearer token.
"""

from __future__ import annotations

import html

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

#: The cookie the dashboard's requests carry the token in.
COOKIE = "farm_token"

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
nav { background: #222; padding: 8px 16px; } nav a { color: #eee; margin-right: 16px; text-decoration: none; }
main { padding: 16px; } table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #ddd; vertical-align: middle; }
.bar { width: 160px; height: 10px; background: #e5e5e5; border-radius: 5px; overflow: hidden; display: inline-block; }
.bar > span { display: block; height: 100%; background: #3a7; }
.state-failed, .error { color: #b22; } button { margin-right: 4px; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; } .gallery img { width: 96px; height: 96px;
  object-fit: cover; cursor: pointer; border: 2px solid transparent; image-rendering: pixelated; }
.gallery img.chosen { border-color: #3a7; } pre { background: #fff; padding: 8px; white-space: pre-wrap; }
textarea { width: 100%; height: 240px; font-family: monospace; }
"""

_COMMON_JS = """
async function api(path, options) {
  const answer = await fetch(path, Object.assign({credentials: 'same-origin'}, options || {}));
  if (answer.status === 401) { location.href = '/login'; throw new Error('not logged in'); }
  return answer;
}
function esc(s) { const d = document.createElement('div'); d.textContent = String(s); return d.innerHTML; }
function eta(s) { return s === null || s === undefined ? '-' : new Date(s * 1000).toISOString().substr(11, 8); }
function bar(p) { return `<span class="bar"><span style="width:${Math.round(p * 100)}%"></span></span>`; }
"""


def _page(title: str, body: str, script: str = "", job: str = "") -> HTMLResponse:
    return HTMLResponse(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)} - farm</title><style>{_STYLE}</style></head>
<body><nav><a href="/">jobs</a><a href="/workers">workers</a><a href="/submit">submit</a>
<a href="/docs">API</a></nav><main data-job="{html.escape(job)}"><h2>{html.escape(title)}</h2>{body}</main>
<script>{_COMMON_JS}{script}</script></body></html>""")


_JOBS_JS = """
const rows = {};
function row(j) {
  const live = ['queued', 'running', 'paused'].includes(j.state);
  const buttons = live ? `<button data-act="cancel">cancel</button>` +
    (j.state === 'paused' ? `<button data-act="resume">resume</button>` : `<button data-act="pause">pause</button>`) : '';
  return `<td><a href="/jobs/${esc(j.job)}">${esc(j.job)}</a></td><td>${esc(j.user)}</td><td>${esc(j.lane)}</td>
    <td>${j.priority}</td><td class="state state-${j.failed ? 'failed' : 'ok'}">${esc(j.state)}</td>
    <td>${bar(j.progress)} ${j.done + j.failed}/${j.total}</td><td>${eta(j.eta_seconds)}</td><td>${buttons}</td>`;
}
function show(j) {
  let tr = rows[j.job];
  if (!tr) { tr = document.createElement('tr'); tr.dataset.job = j.job; rows[j.job] = tr;
             document.querySelector('#jobs tbody').prepend(tr); }
  tr.innerHTML = row(j);
}
document.querySelector('#jobs').addEventListener('click', async (e) => {
  const act = e.target.dataset.act; if (!act) return;
  const job = e.target.closest('tr').dataset.job;
  const answer = await api(`/v1/jobs/${job}/${act}`, {method: 'POST'});
  if (answer.ok) show(await answer.json());
});
(async () => {
  const listed = await (await api('/v1/jobs?limit=100')).json();
  listed.jobs.reverse().forEach(show);
  new EventSource('/v1/events').addEventListener('job', (e) => show(JSON.parse(e.data)));
})();
"""

_JOB_JS = """
const job = document.body.querySelector('main').dataset.job;
async function refresh() {
  const answer = await api(`/v1/jobs/${job}`);
  if (!answer.ok) { document.querySelector('#summary').innerHTML = '<p class="error">no such job</p>'; return; }
  const j = await answer.json();
  document.querySelector('#summary').innerHTML = `<p><span id="state">${esc(j.state)}</span> ${bar(j.progress)}
    ${j.done + j.failed}/${j.total} &middot; ${esc(j.user)}, ${esc(j.lane)} lane &middot; ETA ${eta(j.eta_seconds)}</p>` +
    Object.entries(j.failures).map(([i, r]) => `<p class="error">item ${i}: ${esc(r)}</p>`).join('');
  const items = (await (await api(`/v1/jobs/${job}/items?limit=1000`)).json()).items;
  const gallery = document.querySelector('.gallery');
  for (const item of items) {
    if (item.state !== 'done' || gallery.querySelector(`[data-index="${item.index}"]`)) continue;
    const img = document.createElement('img');
    img.src = item.image_url; img.dataset.index = item.index; img.title = `#${item.index} seed ${item.record.seed}`;
    gallery.append(img);
  }
  if (['done', 'done with failures', 'cancelled'].includes(j.state)) {
    document.querySelector('#links').innerHTML = `<a href="/v1/jobs/${job}/manifest">manifest.jsonl</a>`;
    return true;
  }
}
document.querySelector('.gallery').addEventListener('click', async (e) => {
  const index = e.target.dataset.index; if (index === undefined) return;
  document.querySelectorAll('.gallery img').forEach((i) => i.classList.toggle('chosen', i === e.target));
  const item = await (await api(`/v1/jobs/${job}/items/${index}`)).json();
  document.querySelector('#parameters').textContent = item.parameters;
});
(async () => {
  if (await refresh()) return;
  const events = new EventSource('/v1/events');
  events.addEventListener('job', async (e) => { if (JSON.parse(e.data).job === job && await refresh()) events.close(); });
})();
"""

_WORKERS_JS = """
async function refresh() {
  const w = (await (await api('/v1/workers')).json()).workers;
  document.querySelector('#workers tbody').innerHTML = w.map((x) => `<tr><td>${esc(x.worker)}</td><td>${esc(x.host)}</td>
    <td>${esc(x.device || x.gpu)}</td><td>${esc(x.models.map((m) => m.split('/').pop()).join(', ') || '-')}</td>
    <td>${x.current ? esc(`${x.current.job} #${x.current.chunk} step ${x.current.step}/${x.current.steps}`) : 'idle'}</td>
    <td>${x.images_per_minute.toFixed(1)}</td><td>${x.heartbeat_seconds_ago}s ago</td></tr>`).join('');
}
refresh(); setInterval(refresh, 2000);
"""

_SUBMIT_JS = """
document.querySelector('#submit').addEventListener('submit', async (e) => {
  e.preventDefault();
  const file = document.querySelector('#file').files[0];
  const text = file ? await file.text() : document.querySelector('#spec').value;
  const answer = await api('/v1/jobs', {method: 'POST', headers: {'Content-Type': 'application/toml'}, body: text});
  const out = document.querySelector('#result');
  if (answer.status === 201) { const j = await answer.json(); location.href = `/jobs/${j.id}`; return; }
  const problem = await answer.json();
  const details = Array.isArray(problem.detail) ? problem.detail : [{field: '', msg: problem.detail}];
  out.innerHTML = details.map((d) => `<p class="error"><b>${esc(d.field)}</b>: ${esc(d.msg)}</p>`).join('');
});
"""

_EXAMPLE = """model = "shapes-sd"
prompts = ["a red circle on a white background", "a blue square on a yellow background"]
seeds = { start = 1, count = 4 }
steps = 12
width = 64
height = 64
"""


def dashboard_routes() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    def jobs_page() -> HTMLResponse:
        table = ('<table id="jobs"><thead><tr><th>job</th><th>user</th><th>lane</th><th>priority</th><th>state</th>'
                 '<th>progress</th><th>ETA</th><th></th></tr></thead><tbody></tbody></table>')
        return _page("jobs", table, _JOBS_JS)

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(job_id: str) -> HTMLResponse:
        body = ('<div id="summary"></div><div id="links"></div><div class="gallery"></div>'
                '<h3>parameters</h3><pre id="parameters">click an image</pre>')
        return _page(job_id, body, _JOB_JS, job=job_id)

    @router.get("/workers", response_class=HTMLResponse)
    def workers_page() -> HTMLResponse:
        table = ('<table id="workers"><thead><tr><th>worker</th><th>host</th><th>GPU</th><th>models</th>'
                 '<th>current</th><th>img/min</th><th>heartbeat</th></tr></thead><tbody></tbody></table>')
        return _page("workers", table, _WORKERS_JS)

    @router.get("/submit", response_class=HTMLResponse)
    def submit_page() -> HTMLResponse:
        form = (f'<form id="submit"><p>Paste a job spec (TOML) or choose a file.</p>'
                f'<textarea id="spec" name="spec">{html.escape(_EXAMPLE)}</textarea>'
                f'<p><input type="file" id="file" accept=".toml"> <button type="submit">submit</button></p></form>'
                f'<div id="result"></div>')
        return _page("submit", form, _SUBMIT_JS)

    @router.get("/login", response_class=HTMLResponse)
    def login_page() -> HTMLResponse:
        form = ('<form method="post" action="/login"><p>API token (<code>farm token create --user NAME</code>)</p>'
                '<p><input type="password" name="token" size="60" autofocus> <button>log in</button></p></form>')
        return _page("log in", form)

    @router.post("/login")
    async def login(request: Request) -> RedirectResponse:
        form = parse_qs((await request.body()).decode(errors="replace"))
        answer = RedirectResponse("/", status_code=303)
        answer.set_cookie(COOKIE, (form.get("token") or [""])[0].strip(), httponly=True, samesite="strict",
                          max_age=30 * 24 * 3600)
        return answer

    return router
