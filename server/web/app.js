// agentstream dashboard: a town's agents live — a list, an overview card
// per agent, and one agent's stream.
//
// Every string from the server is put on the page with textContent, never as
// markup: an event's data can't inject HTML or script.

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const TOKEN_KEY = "agentstream.token";
const FAMILIES = ["message", "tool", "session", "output", "agent"];

const app = {
  token: null,
  town: null,
  agents: new Map(), // agent id -> its state, from the list and then the town's stream
  known: new Set(), // agents seen when the page started, or since: a new one is not in it
  view: null, // the agent on screen, or null: the overview
  townStream: null,
  follow: false, // "follow newest in this rig"
  renderQueued: false,
};

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

function stopAll() {
  if (app.view) app.view.close();
  app.view = null;
  if (app.townStream) app.townStream.close();
  app.townStream = null;
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  app.token = null;
  stopAll();
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
  stopAll();
  app.token = token;
  app.town = town;
  app.agents = new Map();
  app.known = new Set();
  $("login").hidden = true;
  $("app").hidden = false;
  $("town").textContent = "of " + town;
  $("overview-town").textContent = town;
  showOverview();
  loadTown();
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

// streamStatus shows a stream's state when it is the one on screen: the
// agent's when one is open, else the town's.
function streamStatus(stream, state, text) {
  if (stream === (app.view ? app.view.stream : app.townStream)) setStatus(state, text);
}

// The protocol the page itself came over; an EventSource on the same
// origin shares it (HTTP/2 carries every stream on one connection).
function pageProtocol() {
  const p = performance.getEntriesByType("navigation")[0]?.nextHopProtocol || "";
  return { h2: "HTTP/2", h3: "HTTP/3", "http/1.1": "HTTP/1.1" }[p] || "HTTP";
}

// ---- streams --------------------------------------------------------------

const MIN_BACKOFF = 500;
const MAX_BACKOFF = 30000;

// Stream is one resumable stream, an agent's or the town's: a fresh ticket
// for each connection, WebSocket first and SSE after two WebSocket failures
// in a row (or when WebSockets are blocked), reconnecting with backoff after
// the last id delivered, so nothing is shown twice or missed.
class Stream {
  // ticketPath asks for tickets; query is added to the stream's path;
  // onEvent and onNotice get what arrives; onEnd, the server's end (an
  // agent's stream ends with its exit).
  constructor({ ticketPath, query = "", after = 0, onEvent, onNotice, onEnd }) {
    Object.assign(this, { ticketPath, query, onEvent, onNotice, onEnd });
    this.lastId = after;
    this.ended = false;
    this.closed = false;
    this.sock = null;
    this.failures = 0; // attempts in a row that did not get a stream going
    this.wsFailures = 0;
    this.useSSE = false;
    this.timer = 0;
    this.connect();
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.drop();
  }

  end() {
    this.ended = true;
    this.drop();
  }

  drop() {
    const s = this.sock;
    this.sock = null;
    if (s) s.close();
  }

  status(state, text) {
    this.shown = [state, text]; // for when this stream comes (back) on screen
    streamStatus(this, state, text);
  }

  async connect() {
    if (this.closed || this.ended) return;
    this.status("connecting", "Connecting…");
    let ticket;
    try {
      ticket = await api("POST", this.ticketPath);
    } catch (e) {
      if (e.status === 401 || e.status === 403) {
        showLogin(e.message);
        return;
      }
      this.retry();
      return;
    }
    if (this.closed) return;
    const path = ticket.stream_path + "&after=" + this.lastId + this.query;
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
      this.status("live", "Live · WebSocket · HTTP/1.1");
    };
    ws.onmessage = (m) => this.receive(m.data);
    ws.onclose = (c) => {
      if (this.sock !== ws) return;
      this.sock = null;
      if (this.closed || this.ended) return;
      if (c.code === 1000 && opened) {
        this.ended = true; // the server ended the stream
        this.onEnd?.();
        return;
      }
      if (!opened && ++this.wsFailures >= 2) this.useSSE = true;
      this.retry(c.reason);
    };
  }

  openSSE(path) {
    const es = new EventSource(path);
    this.sock = es;
    es.onopen = () => {
      this.failures = 0;
      this.status("live", "Live · SSE · " + pageProtocol());
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
      this.status("reconnecting", `Reconnecting in ${Math.ceil(left / 1000)} s` + (reason ? ` (${reason})` : ""));
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
    if (msg.notice) {
      this.onNotice?.(msg);
      return;
    }
    if (typeof msg.id !== "number" || msg.id <= this.lastId) return; // shown already
    this.lastId = msg.id;
    this.onEvent(msg);
  }
}

// ---- the town -------------------------------------------------------------

// How far back the town's stream starts before the newest event the list
// knows: enough recent history for the cards' activity lines.
const TOWN_BACKFILL = 300;

// loadTown reads the agent list once, then keeps it, and the overview,
// current from the town's stream: no polling. The list is read again only
// when the stream says events were pruned before it could deliver them.
async function loadTown() {
  let agents;
  try {
    ({ agents } = await api("GET", `/api/towns/${enc(app.town)}/agents`));
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      showLogin(e.message);
      return;
    }
    setStatus("reconnecting", "Server unreachable; retrying");
    setTimeout(() => app.token && !app.townStream && loadTown(), 2000);
    return;
  }
  let newest = 0;
  for (const a of agents) {
    const have = app.agents.get(a.agent_id);
    app.agents.set(a.agent_id, { ...a, line: have?.line || "", lineId: have?.lineId || 0 });
    app.known.add(a.agent_id);
    newest = Math.max(newest, a.last_event_id);
  }
  queueRender();
  if (app.townStream) return; // a re-read after a gap: the stream goes on
  app.townStream = new Stream({
    ticketPath: `/api/towns/${enc(app.town)}/stream-ticket`,
    query: "&compact=deltas",
    after: Math.max(0, newest - TOWN_BACKFILL),
    onEvent: townEvent,
    onNotice: (n) => {
      if (n.notice === "gap") loadTown();
    },
  });
}

// townEvent updates the agent an event belongs to: its state from events
// newer than what the page knows of it, its activity line from any event
// with something to say.
function townEvent(ev) {
  let a = app.agents.get(ev.agent_id);
  const isNew = !app.known.has(ev.agent_id);
  if (!a) {
    a = { agent_id: ev.agent_id, rig_id: ev.rig_id, last_event_id: 0, exited: false, line: "", lineId: 0 };
    app.agents.set(ev.agent_id, a);
    app.known.add(ev.agent_id);
  }
  if (ev.id > a.last_event_id) {
    a.last_event_id = ev.id;
    a.last_type = ev.type;
    if (ev.type === "agent.exited") {
      a.exited = true;
      a.exit_reason = ev.data?.reason;
      a.exit_code = ev.data?.exit_code;
    } else {
      a.exited = false; // back: a container may restart an agent under its id
    }
  }
  const line = activityLine(ev);
  if (line && ev.id > a.lineId) {
    a.line = line;
    a.lineId = ev.id;
  }
  queueRender();
  const v = app.view;
  if (isNew && app.follow && v && ev.rig_id === v.rig && ev.agent_id !== v.agent) select(ev.agent_id);
}

// activityLine is what a card shows of an event: the end of the latest
// message text, a tool call, an output line; "" for events that say
// nothing worth showing (the card keeps the previous line; the exit is in
// the card's state).
function activityLine(ev) {
  const d = ev.data ?? {};
  const part = d.part;
  const last = (s) => {
    const t = String(s).replace(/\s+/g, " ").trim();
    return t.length > 100 ? "…" + t.slice(-100) : t; // the newest words
  };
  if (ev.type === "message.part.updated" && part?.type === "text" && typeof part.text === "string") return last(part.text);
  if (ev.type === "message.part.updated" && part?.type === "tool") {
    const st = part.state || {};
    return `${part.tool || "tool"} — ${st.status || "pending"}` + (st.input?.command ? ": " + st.input.command : "");
  }
  if (ev.type === "message.updated" && typeof d.text === "string") return (d.role ? d.role + ": " : "") + last(d.text);
  if (ev.type === "output.line" && typeof d.line === "string") return last(d.line);
  return "";
}

function agentState(a) {
  if (!a.exited) return "running";
  let s = "exited";
  if (a.exit_reason) s += ": " + a.exit_reason;
  if (a.exit_code !== undefined && a.exit_code !== null) s += ` (exit ${a.exit_code})`;
  return s;
}

// sortedAgents: running agents first, then the most recently active.
function sortedAgents() {
  return [...app.agents.values()].sort((x, y) => (x.exited - y.exited) || (y.last_event_id - x.last_event_id));
}

// queueRender renders once per frame however many events came.
function queueRender() {
  if (app.renderQueued) return;
  app.renderQueued = true;
  requestAnimationFrame(() => {
    app.renderQueued = false;
    renderAgents();
    renderCards();
  });
}

// keyed updates a list in place, one li per agent keyed by data-agent, so
// keyboard focus stays on the button it is on. make builds a new li's
// button; fill updates one.
function keyed(ul, agents, make, fill) {
  const have = new Map([...ul.children].map((li) => [li.dataset.agent, li]));
  agents.forEach((a, i) => {
    let li = have.get(a.agent_id);
    if (!li) {
      li = document.createElement("li");
      li.dataset.agent = a.agent_id;
      const b = document.createElement("button");
      b.type = "button";
      b.addEventListener("click", () => select(li.dataset.agent));
      make(b);
      li.append(b);
    }
    have.delete(a.agent_id);
    fill(li.firstChild, a);
    li.dataset.state = a.exited ? "exited" : "running";
    if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
  });
  for (const li of have.values()) li.remove();
}

function span(cls) {
  const s = document.createElement("span");
  s.className = cls;
  return s;
}

function stateSpan(a) {
  const st = span(a.exited ? "state-exited" : "state-running");
  st.textContent = agentState(a);
  return st;
}

function renderAgents() {
  const agents = sortedAgents();
  $("agents-empty").hidden = agents.length > 0;
  keyed($("agents"), agents, (b) => b.append(span("agent-name"), span("agent-meta")), (b, a) => {
    b.children[0].textContent = a.agent_id;
    b.children[1].replaceChildren("rig " + a.rig_id + " · ", stateSpan(a));
    b.setAttribute("aria-current", String(app.view?.agent === a.agent_id));
  });
}

function renderCards() {
  const agents = sortedAgents();
  $("cards-empty").hidden = agents.length > 0;
  keyed($("cards"), agents, (b) => {
    const head = span("card-head");
    head.append(span("agent-name"), span("card-rig"));
    b.append(head, span("card-state"), span("card-line"));
  }, (b, a) => {
    b.querySelector(".agent-name").textContent = a.agent_id;
    b.querySelector(".card-rig").textContent = "rig " + a.rig_id;
    b.querySelector(".card-state").replaceChildren(stateSpan(a));
    const line = b.querySelector(".card-line");
    line.textContent = a.line || (a.last_type ? "last: " + a.last_type : "");
    line.dataset.id = String(a.lineId || "");
  });
}

// ---- views ------------------------------------------------------------------

function showOverview() {
  if (app.view) app.view.close();
  app.view = null;
  $("stream").hidden = true;
  $("overview").hidden = false;
  setStatus(...(app.townStream?.shown || ["connecting", "Connecting…"]));
  queueRender();
}

function select(agentId) {
  if (app.view?.agent === agentId) return;
  if (app.view) app.view.close();
  const a = app.agents.get(agentId);
  $("overview").hidden = true;
  app.view = new AgentView(agentId, a?.rig_id || "");
  setStatus(...app.view.stream.shown);
  queueRender();
}

// ---- one agent's stream ---------------------------------------------------

// AgentView is one agent's stream on screen, from its first event. It
// stays on that agent until the user closes it or picks another, or, with
// "follow newest in this rig" on, until a new agent starts in its rig.
class AgentView {
  constructor(agent, rig) {
    this.agent = agent;
    this.rig = rig;
    this.rows = new Map(); // merge key -> row, for growing messages and tool calls

    $("stream").hidden = false;
    $("agent-title").textContent = agent;
    $("agent-rig").textContent = rig ? "rig " + rig : "";
    $("end").hidden = true;
    $("events").replaceChildren();
    $("new-events").hidden = true;
    $("close").onclick = showOverview;
    $("events").onscroll = () => {
      if (atBottom()) $("new-events").hidden = true;
    };
    $("new-events").onclick = () => {
      scrollToBottom();
      $("events").focus();
    };
    this.stream = new Stream({
      ticketPath: `/api/towns/${enc(app.town)}/container/agents/${enc(agent)}/stream-ticket`,
      onEvent: (ev) => this.event(ev),
      onNotice: (n) => this.notice(n),
      onEnd: () => this.ended(),
    });
  }

  get lastId() {
    return this.stream.lastId;
  }

  close() {
    this.stream.close();
  }

  event(ev) {
    appendRow(this, ev);
    if (ev.type === "agent.exited") {
      this.stream.end();
      showEnd(ev.data || {});
      setStatus("ended", "Ended");
    }
  }

  ended() {
    setStatus("ended", "Ended");
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
  $("follow").addEventListener("change", (e) => {
    app.follow = e.target.checked;
  });
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
