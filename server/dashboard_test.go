package server

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/agentstream/agentstream/model"
	"github.com/agentstream/agentstream/poll"
	"github.com/agentstream/agentstream/transport"
)

// browser starts a headless Chromium for one test and returns its context.
// Without chromium the test is skipped, except in CI (CI=true), where that
// is a failure: .ci/run installs it.
func browser(t *testing.T) context.Context {
	t.Helper()
	// The page is the same over either database, and the streams under it
	// are tested on both: one pass of the browser tests is enough.
	onlySQLite(t)
	var path string
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("chromium not found; CI must install it (apt-get install chromium)")
		}
		t.Skip("chromium not found: install it (apt-get install chromium) to run the dashboard tests")
	}
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		// For the TLS fronts' certificates, made by the tests.
		chromedp.Flag("ignore-certificate-errors", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 800),
	)
	ctx, cancelCtx := chromedp.NewContext(alloc)
	ctx, cancelTimeout := context.WithTimeout(ctx, 120*time.Second)
	t.Cleanup(func() {
		cancelTimeout()
		cancelCtx()
		cancelAlloc()
	})
	if err := chromedp.Do(ctx); err != nil { // starts the browser
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// do runs browser steps, failing the test on error.
func do(t *testing.T, ctx context.Context, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatal(err)
	}
}

// evalJS evaluates a JavaScript expression in the page.
func evalJS[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// textOf is the text content of the first element sel matches.
func textOf(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	return evalJS[string](t, ctx, fmt.Sprintf("document.querySelector(%q)?.textContent ?? \"\"", sel))
}

// waitJS waits until the JavaScript expression is truthy in the page.
func waitJS(t *testing.T, ctx context.Context, what, expr string) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	defer cancel()
	if _, err := chromedp.Run(wctx, chromedp.Poll[any](expr, chromedp.WithPollingInterval(50*time.Millisecond))); err != nil {
		t.Fatalf("waiting for %s: %v (status: %q)", what, err, textOf(t, ctx, "#status"))
	}
}

// shownIDs is every event id on the page's rows, in row order (a row of a
// growing message or tool call carries several).
const shownIDs = `[...document.querySelectorAll("#events .row")].flatMap(r => r.dataset.ids.split(" ").filter(Boolean).map(Number))`

func pageIDs(t *testing.T, ctx context.Context) []int64 {
	t.Helper()
	return evalJS[[]int64](t, ctx, shownIDs)
}

// waitShown waits until the page shows n event ids.
func waitShown(t *testing.T, ctx context.Context, n int) []int64 {
	t.Helper()
	waitJS(t, ctx, fmt.Sprintf("%d events on the page", n), fmt.Sprintf("%s.length >= %d", shownIDs, n))
	return pageIDs(t, ctx)
}

// openAgent opens the dashboard at base with the viewer token and selects
// agent.
func openAgent(t *testing.T, ctx context.Context, base, viewer, agent string) {
	t.Helper()
	sel := fmt.Sprintf(`#agents li[data-agent=%q] button`, agent)
	do(t, ctx, chromedp.Navigate(base+"/#token="+viewer))
	waitJS(t, ctx, "the agent in the list", fmt.Sprintf("document.querySelector(%q) !== null", sel))
	do(t, ctx, chromedp.Click(chromedp.CSS(sel)))
}

func (e *testEnv) postAgent(agent, body string) []int64 {
	e.t.Helper()
	return e.postRig("r1", agent, body)
}

func (e *testEnv) postRig(rig, agent, body string) []int64 {
	e.t.Helper()
	code, _, v := e.do("POST", "/api/rigs/"+rig+"/agent-events", e.mustMintAgent("t1", rig, agent), "application/json", []byte(body))
	if code != 201 {
		e.t.Fatalf("post: %d %v", code, v)
	}
	var ids []int64
	for _, id := range v["ids"].([]any) {
		ids = append(ids, int64(id.(float64)))
	}
	return ids
}

func ev(agent, typ string, data any) string {
	b, _ := json.Marshal(map[string]any{"agent_id": agent, "type": typ, "data": data})
	return string(b)
}

func batch(evs ...string) string { return `{"events":[` + strings.Join(evs, ",") + `]}` }

// TestDashboardShowsEvents: events posted before and after the page opens
// appear once each, in order, with their badges; streamed text parts grow
// one message, a tool call is one collapsible row; the token leaves the
// address bar.
func TestDashboardShowsEvents(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	text := func(id, s, delta string) string {
		return ev("a1", "message.part.updated", map[string]any{"message_id": "m2", "part": map[string]any{"id": id, "type": "text", "text": s}, "delta": delta})
	}
	tool := func(status string, output any) string {
		st := map[string]any{"status": status, "input": map[string]any{"command": "go test ./..."}}
		if output != nil {
			st["output"] = output
		}
		return ev("a1", "message.part.updated", map[string]any{"message_id": "m3", "part": map[string]any{"id": "p2", "type": "tool", "tool": "bash", "state": st}})
	}
	want := e.postAgent("a1", batch(
		ev("a1", "session.created", map[string]any{"session_id": "s1"}),
		ev("a1", "message.updated", map[string]any{"role": "user", "text": "Fix the failing test."}),
		text("p1", "Let me", "Let me"),
		text("p1", "Let me run", " run"),
		text("p1", "Let me run the tests.", " the tests."),
		tool("running", nil),
	))
	openAgent(t, ctx, e.base, e.viewer, "a1")
	waitShown(t, ctx, len(want))
	if hash := evalJS[string](t, ctx, `location.hash`); hash != "" {
		t.Fatalf("the token stayed in the address bar: %q", hash)
	}

	want = append(want, e.postAgent("a1", batch(
		tool("completed", "ok  \tapp\t0.1s"),
		ev("a1", "output.line", map[string]any{"stream": "stderr", "line": "warning: slow"}),
		ev("a1", "custom.thing", map[string]any{"n": 1}),
	))...)
	got := waitShown(t, ctx, len(want))
	if !slices.Equal(got, want) {
		t.Fatalf("page shows ids %v, want %v", got, want)
	}

	type row struct {
		Badge string `json:"badge"`
		Text  string `json:"text"`
		IDs   string `json:"ids"`
	}
	rows := evalJS[[]row](t, ctx, `[...document.querySelectorAll("#events .row")].map(r => ({
		badge: r.querySelector(".badge").textContent, text: r.querySelector(".body").textContent, ids: r.dataset.ids}))`)
	wantRows := []struct{ badge, text string }{
		{"session", `"session_id": "s1"`},
		{"message", "Fix the failing test."},
		{"message", "Let me run the tests."},
		{"tool", "bash — completed: go test ./..."},
		{"output", "warning: slow"},
		{"other", "custom.thing"},
	}
	if len(rows) != len(wantRows) {
		t.Fatalf("%d rows, want %d: %+v", len(rows), len(wantRows), rows)
	}
	for i, w := range wantRows {
		if rows[i].Badge != w.badge || !strings.Contains(rows[i].Text, w.text) {
			t.Errorf("row %d: badge %q text %q, want %q containing %q", i, rows[i].Badge, rows[i].Text, w.badge, w.text)
		}
	}
	if n := len(strings.Fields(rows[2].IDs)); n != 3 {
		t.Errorf("the streamed message is one row of 3 events, got ids %q", rows[2].IDs)
	}
	// The tool call opens to show its output.
	do(t, ctx, chromedp.Click(chromedp.CSS("#events details summary")))
	if output := textOf(t, ctx, "#events details"); !strings.Contains(output, "ok  \tapp\t0.1s") {
		t.Errorf("tool output not shown: %q", output)
	}
	if status := textOf(t, ctx, "#status"); !strings.Contains(status, "Live · WebSocket") {
		t.Errorf("status %q, want live over WebSocket", status)
	}
}

// TestBrowserEventSourceOverHTTP2: a browser reaching an https origin
// speaks HTTP/2 to it, to agentstream's own HTTP/2 server: the page, a
// ticket fetched with a POST, and an EventSource on the same connection
// get the backfill and then live events, each once, in order.
func TestBrowserEventSourceOverHTTP2(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	base, _ := e.tlsFront()
	want := e.postAgent("a1", batch(ev("a1", "step", map[string]any{"n": 1}), ev("a1", "step", map[string]any{"n": 2})))
	do(t, ctx, chromedp.Navigate(base+"/"))
	evalJS[string](t, ctx, fmt.Sprintf(`window.got = [];
		fetch("/api/towns/t1/container/agents/a1/stream-ticket", {method: "POST", headers: {Authorization: "Bearer %s"}})
			.then(r => r.json())
			.then(v => { new EventSource(v.stream_path).onmessage = m => window.got.push(JSON.parse(m.data).id); });
		"opening"`, e.viewer))
	waitJS(t, ctx, "the backfill", fmt.Sprintf("window.got.length >= %d", len(want)))
	waitUntil(t, "the stream to be open on HTTP/2", func() bool {
		return e.metric(`agentstream_streams_open{proto="HTTP/2.0",transport="sse"}`) == 1
	})
	want = append(want, e.postAgent("a1", batch(ev("a1", "step", map[string]any{"n": 3})))...)
	waitJS(t, ctx, "the live event", fmt.Sprintf("window.got.length >= %d", len(want)))
	if got := evalJS[[]int64](t, ctx, "window.got"); !slices.Equal(got, want) {
		t.Fatalf("the page got ids %v, want %v", got, want)
	}
	protos := evalJS[[]string](t, ctx, `performance.getEntries().map(e => e.nextHopProtocol).filter(Boolean)`)
	if len(protos) == 0 || slices.ContainsFunc(protos, func(p string) bool { return p != "h2" }) {
		t.Fatalf("the page's requests went over %v, want h2 only", protos)
	}
}

// TestDashboardTokenForm: without a token the page asks for one; a bad
// token is refused with the server's message; a good one shows the town.
func TestDashboardTokenForm(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	e.postAgent("a1", batch(ev("a1", "session.created", map[string]any{})))
	visible := func(sel string) string {
		return fmt.Sprintf("(getComputedStyle(document.querySelector(%q)).display !== 'none')", sel)
	}
	do(t, ctx, chromedp.Navigate(e.base+"/"))
	waitJS(t, ctx, "the token form", visible("#login")+" && !"+visible("#app"))

	forged := e.viewer[:len(e.viewer)-4] + "AAAA" // the signature no longer matches
	do(t, ctx, chromedp.SendKeys(chromedp.CSS("#token"), forged), chromedp.Click(chromedp.CSS("#login button")))
	waitJS(t, ctx, "the refusal", `document.querySelector("#login-error").textContent !== ""`)

	do(t, ctx, chromedp.SetValue(chromedp.CSS("#token"), e.viewer), chromedp.Click(chromedp.CSS("#login button")))
	waitJS(t, ctx, "the agent list", visible("#app")+` && !`+visible("#login")+
		` && document.querySelector('#agents li[data-agent="a1"]') !== null`)
}

// TestDashboardFollowsNewRows: the list stays at its newest row as events
// come, until the user scrolls up; then new rows wait behind a "new events"
// button, which brings the view back down.
func TestDashboardFollowsNewRows(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	lines := func(n int) string {
		evs := make([]string, n)
		for i := range evs {
			evs[i] = ev("a1", "output.line", map[string]any{"stream": "stdout", "line": fmt.Sprint("line ", i)})
		}
		return batch(evs...)
	}
	const atBottom = `(() => { const l = document.querySelector("#events"); return l.scrollHeight - l.scrollTop - l.clientHeight < 40 })()`
	n := len(e.postAgent("a1", lines(60)))
	openAgent(t, ctx, e.base, e.viewer, "a1")
	waitShown(t, ctx, n)
	n += len(e.postAgent("a1", lines(20)))
	waitShown(t, ctx, n)
	if !evalJS[bool](t, ctx, atBottom) {
		t.Fatal("the list did not follow the new rows")
	}
	evalJS[any](t, ctx, `document.querySelector("#events").scrollTop = 0`)
	n += len(e.postAgent("a1", lines(5)))
	waitShown(t, ctx, n)
	if evalJS[bool](t, ctx, atBottom) || evalJS[float64](t, ctx, `document.querySelector("#events").scrollTop`) != 0 {
		t.Fatal("the list moved while the user was reading above")
	}
	waitJS(t, ctx, "the new-events button", `!document.querySelector("#new-events").hidden`)
	do(t, ctx, chromedp.Click(chromedp.CSS("#new-events")))
	waitJS(t, ctx, "the view back at the newest row", atBottom+` && document.querySelector("#new-events").hidden`)
}

// TestDashboardEscapesData: markup in an event's data is shown as text and
// never runs.
func TestDashboardEscapesData(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	evil := `<script>window.__xss=1</script><img src=x onerror="window.__xss=2">`
	want := e.postAgent("a1", batch(
		ev("a1", "message.updated", map[string]any{"role": "user", "text": evil}),
		ev("a1", "output.line", map[string]any{"stream": "stdout", "line": evil}),
		ev("a1", "custom.thing", map[string]any{"html": evil}),
		ev("a1", "message.part.updated", map[string]any{"part": map[string]any{"id": "p", "type": "tool", "tool": evil, "state": map[string]any{"status": evil}}}),
	))
	openAgent(t, ctx, e.base, e.viewer, "a1")
	waitShown(t, ctx, len(want))
	type result struct {
		Elements int    `json:"elements"`
		XSS      any    `json:"xss"`
		Text     string `json:"text"`
	}
	res := evalJS[result](t, ctx, `({elements: document.querySelectorAll("#events img, #events script").length,
		xss: window.__xss ?? null, text: document.querySelector("#events").textContent})`)
	if res.Elements != 0 || res.XSS != nil {
		t.Fatalf("event data became markup: %d img/script elements, window.__xss = %v", res.Elements, res.XSS)
	}
	if strings.Count(res.Text, "<script>window.__xss=1</script>") < 4 {
		t.Fatalf("the markup is not shown as text: %q", res.Text)
	}
}

// TestDashboardExited: agent.exited shows the end state, and the page asks
// for no more streams of that agent while it goes on watching the town:
// agents that start meanwhile, in another rig and in its own, show in the
// list, and the exited agent stays on screen.
func TestDashboardExited(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	want := e.postAgent("a1", batch(ev("a1", "session.created", map[string]any{})))
	openAgent(t, ctx, e.base, e.viewer, "a1")
	waitShown(t, ctx, len(want))
	want = append(want, e.postAgent("a1", batch(ev("a1", model.TypeExited, map[string]any{"reason": "failed", "exit_code": 3})))...)
	waitJS(t, ctx, "the end state", `!document.querySelector("#end").hidden`)
	end, status := textOf(t, ctx, "#end"), textOf(t, ctx, "#status")
	if !strings.Contains(end, "failed") || !strings.Contains(end, "exit code 3") || status != "Ended" {
		t.Fatalf("end %q, status %q", end, status)
	}
	if got := pageIDs(t, ctx); !slices.Equal(got, want) {
		t.Fatalf("page shows ids %v, want %v", got, want)
	}
	waitJS(t, ctx, "the agent list to show the exit", `document.querySelector('#agents li[data-agent="a1"]').textContent.includes("exited: failed (exit 3)")`)
	tickets := e.streamRequests()
	e.postRig("r2", "a2", batch(ev("a2", "session.created", map[string]any{})))
	waitJS(t, ctx, "a2 in the list", `document.querySelector('#agents li[data-agent="a2"]') !== null`)
	e.postAgent("a3", batch(ev("a3", "session.created", map[string]any{})))
	waitJS(t, ctx, "a3, of a1's rig, in the list", `document.querySelector('#agents li[data-agent="a3"]') !== null`)
	if got := e.streamRequests(); got != tickets {
		t.Fatalf("%v stream and ticket requests after the exit, was %v", got, tickets)
	}
	if title := textOf(t, ctx, "#agent-title"); title != "a1" {
		t.Fatalf("the exited agent left the screen for %q", title)
	}
}

// TestDashboardPickedAgentStays: the agent the user picks stays on screen —
// here an older agent that has exited, in a rig where a newer one runs and
// a third one starts. With "follow newest in this rig" on, the view moves
// to the next agent that starts in the rig, and only then.
func TestDashboardPickedAgentStays(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	old := e.postAgent("a1", batch(
		ev("a1", "session.created", map[string]any{}),
		ev("a1", "output.line", map[string]any{"stream": "stdout", "line": "old work"}),
		ev("a1", model.TypeExited, map[string]any{"reason": "completed", "exit_code": 0})))
	e.postAgent("a2", batch(ev("a2", "session.created", map[string]any{})))
	openAgent(t, ctx, e.base, e.viewer, "a1")
	waitJS(t, ctx, "a1's end", `!document.querySelector("#end").hidden`)
	e.postAgent("a2", batch(ev("a2", "output.line", map[string]any{"stream": "stdout", "line": "newer work"})))
	e.postAgent("a3", batch(ev("a3", "session.created", map[string]any{})))
	waitJS(t, ctx, "a3 in the list", `document.querySelector('#agents li[data-agent="a3"]') !== null`)
	if title, ids := textOf(t, ctx, "#agent-title"), pageIDs(t, ctx); title != "a1" || !slices.Equal(ids, old) {
		t.Fatalf("the picked agent a1 gave way: %q shows %v", title, ids)
	}

	do(t, ctx, chromedp.Click(chromedp.CSS("#follow")))
	e.postRig("r2", "b1", batch(ev("b1", "session.created", map[string]any{})))
	waitJS(t, ctx, "b1 in the list", `document.querySelector('#agents li[data-agent="b1"]') !== null`)
	if title := textOf(t, ctx, "#agent-title"); title != "a1" {
		t.Fatalf("following a1's rig, the view moved to %q of another rig", title)
	}
	next := e.postAgent("a4", batch(ev("a4", "session.created", map[string]any{})))
	waitJS(t, ctx, "the view to follow a4", `document.querySelector("#agent-title").textContent === "a4"`)
	if got := waitShown(t, ctx, 1); !slices.Equal(got, next) {
		t.Fatalf("a4's view shows ids %v, want %v", got, next)
	}
}

// cardsJS reads the overview's cards, in order.
const cardsJS = `[...document.querySelectorAll("#cards li")].map(li => ({
	agent: li.dataset.agent, state: li.dataset.state,
	rig: li.querySelector(".card-rig").textContent, line: li.querySelector(".card-line").textContent}))`

type card struct {
	Agent string `json:"agent"`
	State string `json:"state"`
	Rig   string `json:"rig"`
	Line  string `json:"line"`
}

// TestDashboardOverview: the page opens on an overview of the town, a card
// per agent with its rig, state and latest activity, running agents first.
// It follows the town's stream: new text moves a card's line, a new agent
// gets a card, an exit moves its card down; for ten seconds of that the page
// asks for the agent list not once. A card opens its agent's stream.
func TestDashboardOverview(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	text := func(agent, s string) string {
		return ev(agent, "message.part.updated", map[string]any{"message_id": "m1", "part": map[string]any{"id": "p1", "type": "text", "text": s}, "delta": s})
	}
	e.postRig("r2", "b1", batch(ev("b1", "session.created", map[string]any{}), ev("b1", model.TypeExited, map[string]any{"reason": "completed", "exit_code": 0})))
	e.postAgent("a1", batch(ev("a1", "session.created", map[string]any{}), text("a1", "Let me run the tests.")))
	do(t, ctx, chromedp.Navigate(e.base+"/#token="+e.viewer))
	waitJS(t, ctx, "two cards with their lines", `document.querySelectorAll("#cards li").length === 2 &&
		document.querySelector('#cards li[data-agent="a1"] .card-line').textContent === "Let me run the tests." &&
		document.querySelector('#cards li[data-agent="b1"] .card-state').textContent === "exited: completed (exit 0)"`)
	cards := evalJS[[]card](t, ctx, cardsJS)
	if cards[0] != (card{"a1", "running", "rig r1", "Let me run the tests."}) || cards[1].Agent != "b1" || cards[1].Rig != "rig r2" ||
		cards[1].State != "exited" || cards[1].Line != "last: agent.exited" {
		t.Fatalf("cards %+v", cards)
	}

	lists := func() float64 {
		return e.metric(`agentstream_http_request_duration_seconds_count{code="200",route="GET /api/towns/{townId}/agents"}`)
	}
	before := lists()
	start := time.Now()
	for i := 0; time.Since(start) < 10*time.Second; i++ {
		line := fmt.Sprintf("Step %d done.", i)
		e.postAgent("a1", batch(text("a1", line)))
		waitJS(t, ctx, "a1's card to show "+line, fmt.Sprintf(`document.querySelector('#cards li[data-agent="a1"] .card-line').textContent === %q`, line))
		if i == 3 {
			e.postRig("r2", "c1", batch(ev("c1", "session.created", map[string]any{})))
			waitJS(t, ctx, "c1's card", `document.querySelector('#cards li[data-agent="c1"]') !== null`)
		}
	}
	e.postAgent("a1", batch(ev("a1", model.TypeExited, map[string]any{"reason": "failed", "exit_code": 1})))
	waitJS(t, ctx, "a1's card to show the exit", `document.querySelector('#cards li[data-agent="a1"]').dataset.state === "exited"`)
	var order []string
	for _, c := range evalJS[[]card](t, ctx, cardsJS) {
		order = append(order, c.Agent)
	}
	if !slices.Equal(order, []string{"c1", "a1", "b1"}) {
		t.Fatalf("cards in order %v, want the running c1, then a1 (exited last), then b1", order)
	}
	if n := lists() - before; n != 0 {
		t.Fatalf("%v agent list requests in %s of live updates, want none", n, time.Since(start).Round(time.Second))
	}

	do(t, ctx, chromedp.Click(chromedp.CSS(`#cards li[data-agent="c1"] button`)))
	waitJS(t, ctx, "c1's stream", `document.querySelector("#agent-title").textContent === "c1" && `+shownIDs+`.length === 1`)
	do(t, ctx, chromedp.Click(chromedp.CSS("#close")))
	waitJS(t, ctx, "the overview again", `!document.querySelector("#overview").hidden && document.querySelector("#stream").hidden`)
}

// TestDashboardDemoFirstScreen: the link serve --demo prints opens on
// something live: within 5 s of opening it, a running agent's card shows
// its text, and the text moves.
func TestDashboardDemoFirstScreen(t *testing.T) {
	ctx := browser(t)
	sessions := demoSessions(t)
	out := make(lineWriter, 16)
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(sctx, Config{Addr: "127.0.0.1:0", DataDir: t.TempDir(), DB: current.DSN(t), Demo: sessions,
			Out: out, Log: slog.New(slog.DiscardHandler)})
	}()
	t.Cleanup(func() {
		stop()
		<-done
	})
	var link string
	for link == "" {
		select {
		case l := <-out:
			if i := strings.Index(l, "http://"); i >= 0 {
				link = strings.Fields(l[i:])[0]
			}
		case err := <-done:
			t.Fatalf("serve: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("serve --demo printed no link")
		}
	}
	do(t, ctx, chromedp.Navigate(link))
	const running = `document.querySelector('#cards li[data-state="running"] .card-line')`
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := chromedp.Run(wctx, chromedp.Poll[any](running+`?.textContent.length > 0`, chromedp.WithPollingInterval(50*time.Millisecond))); err != nil {
		t.Fatalf("no running agent's text within 5 s of opening the demo link: %v (status %q)", err, textOf(t, ctx, "#status"))
	}
	first := evalJS[string](t, ctx, running+`.textContent`)
	waitJS(t, ctx, "the text to move", fmt.Sprintf(`(%s?.textContent ?? %q) !== %q`, running, first, first))
}

// lineWriter hands each Write to a channel: the output of a Serve running
// on another goroutine, read without a race.
type lineWriter chan string

func (w lineWriter) Write(p []byte) (int, error) {
	w <- string(p)
	return len(p), nil
}

// streamRequests counts ticket and stream requests the server has served.
func (e *testEnv) streamRequests() float64 {
	e.t.Helper()
	resp, err := e.client.Get(e.base + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	var n float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "agentstream_http_request_duration_seconds_count{") ||
			!(strings.Contains(line, `/stream-ticket"`) || strings.Contains(line, `/stream"`)) {
			continue
		}
		var v float64
		fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v)
		n += v
	}
	return n
}

// TestDashboardFallsBackToSSE: behind a proxy that rewrites Host, the
// server's origin rule refuses WebSockets; the page falls back to SSE and
// shows every event.
func TestDashboardFallsBackToSSE(t *testing.T) {
	ctx := browser(t)
	e := newEnv(t)
	target, _ := url.Parse(e.base)
	proxy := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(target) }}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	front := &http.Server{Handler: proxy}
	go front.Serve(ln)
	t.Cleanup(func() { front.Close() })

	want := e.postAgent("a1", batch(ev("a1", "session.created", map[string]any{})))
	openAgent(t, ctx, "http://"+ln.Addr().String(), e.viewer, "a1")
	waitShown(t, ctx, len(want))
	want = append(want, e.postAgent("a1", batch(ev("a1", "output.line", map[string]any{"stream": "stdout", "line": "live"})))...)
	if got := waitShown(t, ctx, len(want)); !slices.Equal(got, want) {
		t.Fatalf("page shows ids %v, want %v", got, want)
	}
	if status := textOf(t, ctx, "#status"); !strings.Contains(status, "Live · SSE") {
		t.Fatalf("status %q, want live over SSE", status)
	}
	if n := e.metric(`agentstream_http_request_duration_seconds_count{code="403",route="GET /api/towns/{townId}/container/agents/{agentId}/stream"}`); n < 2 {
		t.Fatalf("%v WebSocket refusals, want the two that make the page fall back", n)
	}
}

// restartable is a server on a fixed address and database that a
// test can stop and start again.
type restartable struct {
	t      *testing.T
	dsn    string
	addr   string
	secret []byte
	stop   func()
}

func (r *restartable) start() {
	r.t.Helper()
	store, err := model.Open(context.Background(), r.dsn, model.Options{})
	if err != nil {
		r.t.Fatal(err)
	}
	auth, err := NewAuth(r.secret)
	if err != nil {
		r.t.Fatal(err)
	}
	sched := poll.New(store, poll.Options{})
	poller, err := transport.NewPoller()
	if err != nil {
		poller = nil
	}
	api := New(store, sched, auth, Options{Log: slog.New(slog.DiscardHandler), Poller: poller})
	addr := r.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		r.t.Fatal(err)
	}
	r.addr = ln.Addr().String()
	hs := newHTTPServer(api, api.log, 0, 0)
	go hs.Serve(ln)
	r.stop = func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		api.Drain(ctx)
		hs.Close()
		sched.Close()
		store.Close()
		if poller != nil {
			poller.Close()
		}
	}
}

// TestDashboardSurvivesRestart: the server restarts mid-stream on the same
// data directory, with events written while it was down; the page
// reconnects by itself and shows every event exactly once.
func TestDashboardSurvivesRestart(t *testing.T) {
	ctx := browser(t)
	r := &restartable{t: t, dsn: current.DSN(t), secret: []byte(strings.Repeat("k", 32))}
	r.start()
	t.Cleanup(func() { r.stop() })
	auth, _ := NewAuth(r.secret)
	viewer, _ := auth.MintViewer("t1", time.Hour)
	agentTok, _ := auth.MintAgent("t1", "r1", "a1", time.Hour)
	client := &http.Client{Timeout: 10 * time.Second}
	post := func(n int) {
		t.Helper()
		evs := make([]string, n)
		for i := range evs {
			evs[i] = ev("a1", "output.line", map[string]any{"stream": "stdout", "line": fmt.Sprint("line ", i)})
		}
		req, _ := http.NewRequest("POST", "http://"+r.addr+"/api/rigs/r1/agent-events", strings.NewReader(batch(evs...)))
		req.Header.Set("Authorization", "Bearer "+agentTok)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil || resp.StatusCode != 201 {
			t.Fatalf("post: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	post(5)
	openAgent(t, ctx, "http://"+r.addr, viewer, "a1")
	waitShown(t, ctx, 5)
	waitJS(t, ctx, "live", `document.querySelector("#status").dataset.state === "live"`)

	r.stop()
	waitJS(t, ctx, "the page to notice", `document.querySelector("#status").dataset.state !== "live"`)
	// Written while the server is down, straight into its database.
	store, err := model.Open(context.Background(), r.dsn, model.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := store.Append(context.Background(), []model.Event{{TownID: "t1", RigID: "r1", AgentID: "a1", Type: "output.line",
			Data: json.RawMessage(fmt.Sprintf(`{"stream":"stdout","line":"offline %d"}`, i))}}); err != nil {
			t.Fatal(err)
		}
	}
	store.Close()
	r.start()
	post(4)

	got := waitShown(t, ctx, 12)
	want := make([]int64, 12)
	for i := range want {
		want[i] = int64(i + 1)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("page shows ids %v, want %v", got, want)
	}
	waitJS(t, ctx, "live again", `document.querySelector("#status").dataset.state === "live"`)
}

// TestDashboardScreenshot writes the README's screenshot: the overview of a
// town with the demo sessions, two agents mid-session and one done. It runs
// only when AGENTSTREAM_SCREENSHOT names the file.
func TestDashboardScreenshot(t *testing.T) {
	out := os.Getenv("AGENTSTREAM_SCREENSHOT")
	if out == "" {
		t.Skip("set AGENTSTREAM_SCREENSHOT=docs/dashboard.png to write the screenshot")
	}
	ctx := browser(t)
	e := newEnv(t)
	sessions := demoSessions(t)
	for _, a := range []struct {
		rig, agent string
		session    []RecordedEvent
	}{
		{DemoRig, "coder-2", sessions[1]},                        // done
		{"ci-rig", "fixer-1", sessions[0][:len(sessions[0])-12]}, // mid-session: still running
		{DemoRig, "coder-3", sessions[1][:len(sessions[1])-20]},
	} {
		var evs []model.Event
		for _, rec := range a.session {
			evs = append(evs, model.Event{TownID: "t1", RigID: a.rig, AgentID: a.agent, Type: rec.Type, Data: rec.Data})
		}
		if err := e.store.Append(context.Background(), evs); err != nil {
			t.Fatal(err)
		}
	}
	do(t, ctx, chromedp.Navigate(e.base+"/#token="+e.viewer))
	waitJS(t, ctx, "three cards with their lines", `[...document.querySelectorAll("#cards .card-line")].filter(l => l.textContent && !l.textContent.startsWith("last:")).length === 3`)
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// demoSessions reads the recorded demo sessions serve --demo replays.
func demoSessions(t *testing.T) [][]RecordedEvent {
	t.Helper()
	var sessions [][]RecordedEvent
	for _, f := range []string{"01-fix-failing-test.jsonl", "02-add-healthcheck.jsonl"} {
		b, err := os.ReadFile("../testdata/demo/" + f)
		if err != nil {
			t.Fatal(err)
		}
		s, err := ParseSession(b)
		if err != nil {
			t.Fatal(err)
		}
		sessions = append(sessions, s)
	}
	return sessions
}
