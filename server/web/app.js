// agentstream dashboard: the agents of a town, and one agent's stream, live.
//
// Every string from the server is put on the page with textContent, never as
// markup: an event's data can't inject HTML or script.

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const TOKEN_KEY = "agentstream.token";
const FAMILIES = ["message", "tool", "session", "output", "agent"];

const app = { token: null, town: null, agents: [], view: null, pollTimer: 0 };

// ---- token --------------------------------------------------------------

// The token arrives in the fragment (never sent to a server, kept out of
// logs), is moved to sessionStorage, and the fragment is cleared.
function takeToken() {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

// townOf reads the town claim of a viewer token. The server checks the
// signature; the page only needs to know which town to ask for.
function townOf(token) {
  try {
    const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return typeof claims.town === "string" ? claims.town : null;
  } catch {
    return null;
  }
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  app.token = null;
  clearTimeout(app.pollTimer);
  if (app.view) app.view.close();
  app.view = null;
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("idle", "Not connected");
  $("token").focus();
}

function start(token) {
  const town = townOf(token);
  if (!town) {
    showLogin("That is not a viewer token (it carries no town).");
    return;
  }
  app.token = token;
  app.town = town;
  $("login").hidden = true;
  $("app").hidden = false;
  $("town").textContent = "of " + town;
  pollAgents();
}

// ---- API ----------------------------------------------------------------

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path) {
  const r = await fetch(path, { method, headers: { Authorization: "Bearer " + app.token } });
  let body = null;
  try {
    body = await r.json();
  } catch {
    // not JSON: described by the status below
  }
  if (!r.ok) throw new APIError(r.status, body?.error?.message || `${r.status} ${r.statusText}`);
  return body;
}

// ---- status -------------------------------------------------------------

function setStatus(state, text) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
}

// The protocol the page itself came over; an EventSource on the same
// origin shares it (HTTP/2 carries every stream on one connection).
function pageProtocol() {
  const p = performance.getEntriesByType("navigation")[0]?.nextHopProtocol || "";
  return { h2: "HTTP/2", h3: "HTTP/3", "http/1.1": "HTTP/1.1" }[p] || "HTTP";
}

// ---- agents -------------------------------------------------------------

async function pollAgents() {
  clearTimeout(app.pollTimer);
  if (!app.token) return;
  try {
    const { agents } = await api("GET", `/api/towns/${enc(app.town)}/agents`);
    app.agents = agents;
    renderAgents();
    followRig();
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      showLogin(e.message);
      return;
    }
    // The server may be restarting: keep the list, try again.
  }
  app.pollTimer = setTimeout(pollAgents, 2000);
}

function agentState(a) {
  if (!a.exited) return "running";
  let s = "exited";
  if (a.exit_reason) s += ": " + a.exit_reason;
  if (a.exit_code !== undefined && a.exit_code !== null) s += ` (exit ${a.exit_code})`;
  return s;
}

// renderAgents updates the list in place, keyed by agent, so keyboard
// focus stays on the button it is on.
function renderAgents() {
  const ul = $("agents");
  $("agents-empty").hidden = app.agents.length > 0;
  const have = new Map([...ul.children].map((li) => [li.dataset.agent, li]));
  app.agents.forEach((a, i) => {
    let li = have.get(a.agent_id);
    if (!li) {
      li = document.createElement("li");
      li.dataset.agent = a.agent_id;
      const b = document.createElement("button");
      b.type = "button";
      const name = document.createElement("span");
      name.className = "agent-name";
      const meta = document.createElement("span");
      meta.className = "agent-meta";
      b.append(name, meta);
      b.addEventListener("click", () => select(a.agent_id));
      li.append(b);
    }
    have.delete(a.agent_id);
    const b = li.firstChild;
    b.children[0].textContent = a.agent_id;
    const meta = b.children[1];
    meta.replaceChildren();
    const st = document.createElement("span");
    st.className = a.exited ? "state-exited" : "state-running";
    st.textContent = agentState(a);
    meta.append("rig " + a.rig_id + " · ", st);
    b.setAttribute("aria-current", String(app.view?.agent === a.agent_id));
    if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
  });
  for (const li of have.values()) {
    if (app.view?.agent !== li.dataset.agent) li.remove();
  }
}

// followRig: an exited agent stays on screen until the user closes it, or
// until a new agent starts in the same rig; then the view moves to it.
function followRig() {
  const v = app.view;
  if (!v || !v.ended) return;
  const next = app.agents.find((a) => a.rig_id === v.rig && a.agent_id !== v.agent && !a.exited && a.last_event_id > v.lastId);
  if (next) select(next.agent_id);
}

function select(agentId) {
  if (app.view?.agent === agentId) return;
  if (app.view) app.view.close();
  const a = app.agents.find((x) => x.agent_id === agentId);
  app.view = new AgentView(agentId, a?.rig_id || "");
  renderAgents();
}

// ---- one agent's stream ---------------------------------------------------

const MIN_BACKOFF = 500;
const MAX_BACKOFF = 30000;

class AgentView {
  constructor(agent, rig) {
    this.agent = agent;
    this.rig = rig;
    this.lastId = 0; // the last event shown: every reconnect resumes after it
    this.ended = false;
    this.closed = false;
    this.sock = null;
    this.failures = 0; // attempts in a row that did not get a stream going
    this.wsFailures = 0;
    this.useSSE = false;
    this.timer = 0;
    this.rows = new Map(); // merge key -> row, for growing messages and tool calls

    $("stream").hidden = false;
    $("agent-title").textContent = agent;
    $("end").hidden = true;
    $("events").replaceChildren();
    $("new-events").hidden = true;
    $("close").onclick = () => {
      this.close();
      app.view = null;
      $("stream").hidden = true;
      setStatus("idle", "Not watching");
      renderAgents();
    };
    $("events").onscroll = () => {
      if (atBottom()) $("new-events").hidden = true;
    };
    $("new-events").onclick = () => {
      scrollToBottom();
      $("events").focus();
    };
    this.connect();
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.drop();
  }

  drop() {
    const s = this.sock;
    this.sock = null;
    if (s) s.close();
  }

  // connect fetches a fresh ticket (each is good for one stream) and opens
  // the stream after the last id shown: WebSocket first, SSE after two
  // WebSocket failures in a row or when WebSockets are blocked.
  async connect() {
    if (this.closed || this.ended) return;
    setStatus("connecting", "Connecting…");
    let ticket;
    try {
      ticket = await api("POST", `/api/towns/${enc(app.town)}/container/agents/${enc(this.agent)}/stream-ticket`);
    } catch (e) {
      if (e.status === 401 || e.status === 403) {
        showLogin(e.message);
        return;
      }
      this.retry();
      return;
    }
    if (this.closed) return;
    const path = ticket.stream_path + "&after=" + this.lastId;
    if (!this.useSSE) {
      try {
        this.openWS(path);
        return;
      } catch {
        this.useSSE = true; // blocked (a policy refused the constructor)
      }
    }
    this.openSSE(path);
  }

  openWS(path) {
    const ws = new WebSocket((location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + path);
    this.sock = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.wsFailures = 0;
      this.failures = 0;
      setStatus("live", "Live · WebSocket · HTTP/1.1");
    };
    ws.onmessage = (m) => this.receive(m.data);
    ws.onclose = (c) => {
      if (this.sock !== ws) return;
      this.sock = null;
      if (this.closed || this.ended) return;
      if (!opened && ++this.wsFailures >= 2) this.useSSE = true;
      this.retry(c.reason);
    };
  }

  openSSE(path) {
    const es = new EventSource(path);
    this.sock = es;
    es.onopen = () => {
      this.failures = 0;
      setStatus("live", "Live · SSE · " + pageProtocol());
    };
    es.onmessage = (m) => this.receive(m.data);
    es.addEventListener("gap", (m) => this.receive(m.data, "gap"));
    // EventSource would reconnect by itself with the same, used-up ticket:
    // close it and reconnect with a fresh one instead.
    es.onerror = () => {
      if (this.sock !== es) return;
      this.sock = null;
      es.close();
      if (this.closed || this.ended) return;
      this.retry();
    };
  }

  // retry waits, with exponential backoff and jitter, then connects again.
  retry(reason) {
    this.failures++;
    const base = Math.min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (this.failures - 1));
    const delay = Math.min(MAX_BACKOFF, Math.max(MIN_BACKOFF, base * (0.75 + Math.random() * 0.5)));
    const at = Date.now() + delay;
    const tick = () => {
      if (this.closed) return;
      const left = at - Date.now();
      if (left <= 0) {
        this.connect();
        return;
      }
      setStatus("reconnecting", `Reconnecting in ${Math.ceil(left / 1000)} s` + (reason ? ` (${reason})` : ""));
      this.timer = setTimeout(tick, Math.min(left, 1000));
    };
    tick();
  }

  // receive takes one message of either transport: an event, or a notice
  // (named in the JSON on a WebSocket, by the SSE event name on SSE).
  receive(data, notice) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return; // not JSON: nothing to show
    }
    if (notice) msg.notice = notice;
    if (msg.notice) this.notice(msg);
    else this.event(msg);
  }

  event(ev) {
    if (typeof ev.id !== "number" || ev.id <= this.lastId) return; // shown already
    this.lastId = ev.id;
    appendRow(this, ev);
    if (ev.type === "agent.exited") {
      this.ended = true;
      this.drop();
      showEnd(ev.data || {});
      setStatus("ended", "Ended");
      pollAgents();
    }
  }

  notice(n) {
    if (n.notice !== "gap") return;
    const row = makeRow("notice", "gap", null);
    row.body.append(textBlock(`Events after #${n.after} were pruned before they could be shown; going on from #${n.first_id}.`));
    place(row.li);
  }
}

function showEnd(data) {
  const end = $("end");
  const reason = typeof data.reason === "string" ? data.reason : "";
  end.dataset.reason = reason;
  let text = "Agent exited";
  if (reason) text += ": " + reason;
  if (data.exit_code !== undefined && data.exit_code !== null) text += ` (exit code ${data.exit_code})`;
  end.textContent = text + ".";
  end.hidden = false;
}

// ---- rows -------------------------------------------------------------------

function family(ev) {
  if (ev.type === "message.part.updated" && ev.data?.part?.type === "tool") return "tool";
  const f = String(ev.type).split(".")[0];
  return FAMILIES.includes(f) ? f : "other";
}

// mergeKey groups the events of one growing thing: a streamed text part,
// a tool call from running to completed.
function mergeKey(ev) {
  const part = ev.data?.part;
  if (ev.type === "message.part.updated" && part && (part.id || part.call_id)) return "part:" + (part.id || part.call_id);
  return null;
}

function makeRow(fam, label, ev) {
  const li = document.createElement("li");
  li.className = "row fam-" + fam;
  li.dataset.ids = "";
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = label;
  const time = document.createElement("time");
  if (ev?.created_at) {
    const d = new Date(ev.created_at);
    time.dateTime = ev.created_at;
    time.textContent = isNaN(d) ? "" : d.toLocaleTimeString();
  }
  const body = document.createElement("div");
  body.className = "body";
  li.append(badge, time, body);
  return { li, body };
}

function textBlock(text, cls = "text") {
  const p = document.createElement("p");
  p.className = cls;
  p.textContent = text;
  return p;
}

function pre(value) {
  const p = document.createElement("pre");
  p.textContent = typeof value === "string" ? value : JSON.stringify(value, null, 2);
  return p;
}

function appendRow(view, ev) {
  const key = mergeKey(ev);
  let row = key && view.rows.get(key);
  const fam = family(ev);
  if (!row) {
    row = makeRow(fam, fam, ev);
    row.text = "";
    if (key) view.rows.set(key, row);
    render(row, ev);
    row.li.dataset.ids = String(ev.id);
    place(row.li);
    return;
  }
  render(row, ev);
  row.li.dataset.ids += " " + ev.id;
  place(null);
}

function render(row, ev) {
  const d = ev.data ?? {};
  const part = d.part;
  const body = row.body;
  if (ev.type === "message.part.updated" && part?.type === "text") {
    // A streamed text part: the full text so far if given, else the deltas joined.
    row.text = typeof part.text === "string" ? part.text : row.text + (typeof d.delta === "string" ? d.delta : "");
    body.replaceChildren(textBlock(row.text));
    return;
  }
  if (ev.type === "message.part.updated" && part?.type === "tool") {
    const wasOpen = body.querySelector("details")?.open ?? false;
    const st = part.state || {};
    const det = document.createElement("details");
    det.open = wasOpen;
    const sum = document.createElement("summary");
    let s = `${part.tool || "tool"} — ${st.status || "pending"}`;
    if (typeof st.duration_ms === "number") s += ` (${(st.duration_ms / 1000).toFixed(1)} s)`;
    if (st.input?.command) s += ": " + st.input.command;
    sum.textContent = s;
    det.append(sum);
    if (st.input !== undefined) {
      const h = document.createElement("h4");
      h.textContent = "Input";
      det.append(h, pre(st.input));
    }
    if (st.output !== undefined) {
      const h = document.createElement("h4");
      h.textContent = "Output";
      det.append(h, pre(st.output));
    }
    if (st.error !== undefined) {
      const h = document.createElement("h4");
      h.textContent = "Error";
      det.append(h, pre(st.error));
    }
    body.replaceChildren(det);
    return;
  }
  if (ev.type === "message.updated" && typeof d.text === "string") {
    const p = textBlock(d.text);
    if (d.role) {
      const r = document.createElement("span");
      r.className = "role";
      r.textContent = d.role;
      p.prepend(r);
    }
    body.replaceChildren(p);
    return;
  }
  if (ev.type === "output.line" && typeof d.line === "string") {
    const p = pre(d.line);
    if (d.stream === "stderr") p.className = "stderr";
    body.replaceChildren(p);
    return;
  }
  if (ev.type === "agent.exited") {
    let s = "Exited";
    if (d.reason) s += ": " + d.reason;
    if (d.exit_code !== undefined) s += ` (exit code ${d.exit_code})`;
    body.replaceChildren(textBlock(s));
    return;
  }
  const t = document.createElement("div");
  t.className = "type";
  t.textContent = ev.type;
  body.replaceChildren(t, pre(d));
}

function atBottom() {
  const el = $("events");
  return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
}

function scrollToBottom() {
  const el = $("events");
  el.scrollTop = el.scrollHeight;
  $("new-events").hidden = true;
}

// place adds li (or only grows the view when null), following new rows
// unless the user has scrolled up; then the "new events" button shows.
function place(li) {
  const follow = atBottom();
  if (li) $("events").append(li);
  if (follow) scrollToBottom();
  else $("new-events").hidden = false;
}

// ---- start --------------------------------------------------------------------

function init() {
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, t);
    start(t);
  });
  window.addEventListener("hashchange", () => {
    const t = takeToken();
    if (t && t !== app.token) start(t);
  });
  const token = takeToken();
  if (token) start(token);
  else showLogin();
}

init();
